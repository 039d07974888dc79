"""`autoprune search | best | serve | front | ui | publish | retarget | demo | methods | check | doctor | bench`.

Exit status: 0 = the command ran (for `search`, `demo` and `retarget`: the search ran to its end; its front may be
empty, when no trial beat the dense model on latency or accuracy: the summary says so, and nothing is registered);
1 = an error the user can fix (one line on stderr; `--debug` shows the traceback); 2 = a usage error (argparse);
130 = interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from autoprune.argtypes import fraction, port, positive_float, positive_int
from autoprune.errors import AutopruneError
from autoprune.tracking.store import DEFAULT_WORKDIR


def _tracking_uri(args) -> str:
    from autoprune.tracking.store import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, None, args.workdir)


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local "
                                               "sqlite store in --workdir)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="local store, Ray results and caches "
                                                                   f"(default: ./{DEFAULT_WORKDIR})")


def _add_search_choice(parser: argparse.ArgumentParser) -> None:
    """Which search `front` and `ui` show: `--experiment` or `--run` (default: the newest finished one)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="the newest finished search of this experiment (default: of any)")
    which.add_argument("--run", help="the search with this run id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("search", help="run a pruning search from a YAML spec")
    run.add_argument("spec", help="path to a spec YAML (see search_spaces/)")
    run.add_argument("--address", help="Ray cluster: auto or ray://HOST:10001 (default: a local Ray)")
    run.add_argument("--trials", type=positive_int, help="override search.trials")
    run.add_argument("--storage", help="override search.storage: where trials write checkpoints, reachable from every"
                                       " node (a shared path, s3://bucket/prefix, gs://…; default: <workdir>/ray)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                     help="continue a search whose driver stopped: its run id (printed when it started), or nothing"
                          " for the newest unfinished search of this spec; ended trials are kept, the others run")
    run.add_argument("--warm-start", metavar="RUN",
                     help="begin from an earlier search's trials (its run id; same MLflow and storage): Optuna is told"
                          " what they measured where model, data and device match, else they are run again first")
    run.add_argument("--drop-unusable-methods", action="store_true",
                     help="leave out a pruning method that cannot prune the spec's model (see `autoprune check`)"
                          " instead of stopping with an error")
    _add_store_flags(run)

    retarget = commands.add_parser("retarget", help="time a finished search's healed models on another device and"
                                                    " publish that device's front (no healing)")
    retarget.add_argument("run", help="the search's run id (printed when it started)")
    retarget.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="time on a CPU worker or on a GPU"
                                                                                   " worker (default: cpu)")
    retarget.add_argument("--cpus", type=positive_int, default=1, help="CPUs (threads) of the timing worker (default: 1)")
    retarget.add_argument("--accelerator-type", help="time on a GPU of this Ray accelerator type (e.g. L4, A10G)")
    retarget.add_argument("--address", help="Ray cluster to time on (default: a local Ray)")
    retarget.add_argument("--storage", help="the search's storage, if not the spec's search.storage or <workdir>/ray")
    _add_store_flags(retarget)

    publish = commands.add_parser("publish", help="(re)publish a search's trials, front and models to MLflow from"
                                                  " Ray Tune's storage (after MLflow was unreachable)")
    publish.add_argument("run", help="the search's run id (printed when it started)")
    publish.add_argument("--storage", help="the search's storage, if not the spec's search.storage or <workdir>/ray")
    _add_store_flags(publish)

    best = commands.add_parser("best", help="the most accurate registered model within a latency target")
    best.add_argument("--model", required=True, help="registered model name")
    best.add_argument("--max-latency-ms", type=positive_float, required=True, help="latency target (median, ms)")
    best.add_argument("--device", help="only versions measured on this device (as tagged, e.g. 'NVIDIA H100 80GB HBM3')")
    best.add_argument("--batch-size", type=positive_int, help="only versions measured at this batch size")
    best.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="only versions measured in this dtype")
    best.add_argument("--runtime", choices=["torch", "onnxruntime"], help="only versions measured in this runtime")
    best.add_argument("--json", action="store_true", help="print one JSON object")
    _add_store_flags(best)

    serving = commands.add_parser("serve", help="serve the best registered model within a latency target over HTTP"
                                                " (Ray Serve)")
    serving.add_argument("--model", required=True, help="registered model name")
    serving.add_argument("--max-latency-ms", type=positive_float, required=True, help="latency target (median, ms)")
    serving.add_argument("--host", default="127.0.0.1", help="HTTP interface (default: loopback only)")
    serving.add_argument("--port", type=port, default=8000)
    serving.add_argument("--device", help="run it on cuda or cpu (default: the kind of device it was measured on)")
    serving.add_argument("--measured-on", help="only versions measured on this device (as `best --device`)")
    serving.add_argument("--batch-size", type=positive_int, help="only versions measured at this batch size")
    serving.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="only versions measured in this dtype")
    serving.add_argument("--runtime", choices=["torch", "onnxruntime"], help="only versions measured in this runtime")
    serving.add_argument("--address", help="Ray cluster to run on (default: a local Ray)")
    _add_store_flags(serving)

    front = commands.add_parser("front", help="print a search's Pareto front: the newest finished search's, or the"
                                              " one chosen as `ui` chooses")
    _add_search_choice(front)
    front.add_argument("--json", action="store_true", help="print one JSON object: the search and its front's rows")
    front.add_argument("--plot", metavar="FILE", help="also write every trial's accuracy against latency, the front"
                                                      " joined, to FILE (.png, or .html with each point's configuration)")
    _add_store_flags(front)

    ui = commands.add_parser("ui", help="MLflow's UI opened on a search's front: serves a local store (until Ctrl-C)"
                                        " and prints the address; for a tracking server, prints it")
    _add_search_choice(ui)
    ui.add_argument("--host", default="127.0.0.1", help="interface to serve a local store on (default: loopback only)")
    ui.add_argument("--port", type=port, default=5000)
    _add_store_flags(ui)

    demo = commands.add_parser("demo", help="the embedded default: a small search that runs on a laptop")
    demo.add_argument("--trials", type=positive_int, help="override the demo's 12 trials")
    _add_store_flags(demo)

    commands.add_parser("methods", help="list the registered pruning and healing methods")

    check = commands.add_parser("check", help="what each pruning method does to a timm model (random weights, CPU,"
                                              " seconds): works, removes nothing, refuses or fails, and why")
    check.add_argument("model", help="timm model name")
    check.add_argument("--num-classes", type=positive_int, default=1000)
    check.add_argument("--kwargs", default="{}", help="timm.create_model arguments as JSON, e.g. '{\"img_size\": 64}'")
    check.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                       help="input size (default: the model's own)")
    check.add_argument("--methods", nargs="+", help="pruning methods to check (default: all registered)")
    check.add_argument("--sparsities", type=fraction, nargs="+", default=[0.3, 0.5],
                       help="what a method that takes a sparsity is asked for (default: 0.3 0.5)")
    check.add_argument("--heal", nargs="*", metavar="METHOD",
                       help="healing methods to train one step on each pruned model (default: every registered one"
                            " that trains; none: give the flag alone)")
    check.add_argument("--json", action="store_true", help="print one JSON object")

    doctor = commands.add_parser("doctor", help="check this machine and cluster end to end (GPUs, 2:4 kernels, NCCL,"
                                                " Ray, MLflow, storage, a tiny trial per path); run it first")
    doctor.add_argument("--address", help="Ray cluster to check (default: a local Ray)")
    doctor.add_argument("--storage", help="the storage a search would use (search.storage / --storage)")
    doctor.add_argument("--json", action="store_true", help="print the rows as JSON")
    doctor.add_argument("--acceptance", action="store_true",
                        help="run two 4-trial bf16 searches (a ViT, a BatchNorm CNN) and check that every registered"
                             " version, loaded from the registry, scores and runs as registered (one table)")
    _add_store_flags(doctor)

    from autoprune.bench.commands import add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing outside may be reachable
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AutopruneError as error:
        if args.debug:
            raise
        print(f"autoprune: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


def _search(args) -> int:
    from autoprune.driver.search import search

    search(args.spec, address=args.address, tracking_uri=args.tracking_uri, workdir=args.workdir, trials=args.trials,
           storage=args.storage, resume=args.resume, drop_unusable_methods=args.drop_unusable_methods,
           warm_start_from=args.warm_start)
    # an empty front is the search's answer (its summary says so), not a failure: a scheduler must not read a crash
    return 0


def _retarget(args) -> int:
    from autoprune.driver.retarget import retarget

    retarget(args.run, tracking_uri=_tracking_uri(args), workdir=Path(args.workdir), device=args.device,
             cpus=args.cpus, accelerator_type=args.accelerator_type, address=args.address, storage=args.storage)
    return 0  # ran to its end, even when no model beat the dense model on that device (an empty front)


def _publish(args) -> int:
    from autoprune.tracking.publish import publish_run

    publish_run(args.run, tracking_uri=_tracking_uri(args), workdir=Path(args.workdir).resolve(), storage=args.storage)
    return 0


def _serve(args) -> int:
    from autoprune.ports import check_port_free

    if args.address in (None, "auto", "local"):  # its HTTP proxy binds on this machine: a port in use fails now
        check_port_free(args.host, args.port, holder="another server (an earlier `autoprune serve`?)")
    from ray import serve

    from autoprune.driver.connect import start_ray
    from autoprune.serve import PrunedModel, replica_options
    from autoprune.tracking.select import best

    conditions = {key: value for key, value in (("device", args.measured_on), ("batch_size", args.batch_size),
                                                 ("dtype", args.dtype), ("runtime", args.runtime)) if value is not None}
    choice = best(model=args.model, max_latency_ms=args.max_latency_ms, tracking_uri=_tracking_uri(args), **conditions)
    start_ray(args.address)
    import ray

    options = replica_options(choice, device=args.device, cluster=ray.cluster_resources())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(PrunedModel.options(ray_actor_options=options).bind(
        args.model, args.max_latency_ms, _tracking_uri(args), args.device, conditions), blocking=False)
    print(f"autoprune: {choice.summary()}")
    if args.device and args.device.split(":")[0] != ("cuda" if choice.on_gpu else "cpu"):
        print(f"autoprune: served on {args.device}, though measured on {choice.device}: its registered latency does"
              " not apply here")
    print(f"autoprune: serving the best version of {args.model!r} within {args.max_latency_ms:g} ms at"
          f" http://{args.host}:{args.port}/ (POST {{\"images\": [...]}}; GET describes it). Ctrl-C stops.")
    try:
        import time

        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _best(args) -> int:
    from autoprune.tracking.select import best

    choice = best(model=args.model, max_latency_ms=args.max_latency_ms, device=args.device,
                  batch_size=args.batch_size, dtype=args.dtype, runtime=args.runtime,
                  tracking_uri=_tracking_uri(args))
    if args.json:
        print(json.dumps(choice.as_dict()))
    else:
        print(choice.summary())
        # with the store it came from: without it, MLflow resolves models:/ against ./mlflow.db (and creates it)
        print(f"load it with: autoprune.load_model({choice.model_uri!r}, tracking_uri={_tracking_uri(args)!r})"
              "  # in the recipe it was timed in")
    return 0


def _front(args) -> int:
    from autoprune.tracking.report import TABLE_COLUMNS, plot_html, plot_png, table
    from autoprune.tracking.select import search_rows

    search, rows, dense = search_rows(experiment=args.experiment, run_id=args.run, tracking_uri=_tracking_uri(args))
    front = [row for row in rows if row["pareto"]]
    if args.plot:
        plot = plot_html if args.plot.endswith(".html") else plot_png
        plot([*rows, dense], args.plot, title=f"{search.experiment}: {len(rows)} trials, {len(front)} on the front",
             device=dense.get("device") or "")
    if args.json:
        print(json.dumps({"experiment": search.experiment, "run_id": search.run_id, "front": front, "dense": dense}))
    elif front:
        print(f"The front of search run {search.run_id} (experiment {search.experiment!r}), fastest first, and the"
              " dense model:")
        registered = (("version", "version", "{}"), ("aliases", "aliases", "{}"))
        print(table([*front, dense], columns=(*TABLE_COLUMNS, *registered)))
    else:
        print(f"Search run {search.run_id} (experiment {search.experiment!r}) has an empty front: no trial beat the"
              " dense model on latency and accuracy, and nothing was registered.")
    if args.plot and not args.json:
        print(f"the plot: {args.plot}")
    return 0


def _ui(args) -> int:
    from autoprune.tracking.store import is_tracking_server
    from autoprune.tracking.ui import find_search, serve_ui
    from autoprune.tracking.view import ui_address

    tracking_uri = _tracking_uri(args)
    found = find_search(tracking_uri, experiment=args.experiment, run_id=args.run)
    what = f"The front of search run {found.run_id} (experiment {found.experiment!r})"
    if is_tracking_server(tracking_uri):
        print(f"{what}: {ui_address(tracking_uri, found.path)}")
        return 0

    def ready(base_url: str) -> None:
        print(f"{what}: {ui_address(base_url, found.path)}\n(MLflow's UI on {tracking_uri}; Ctrl-C stops it)",
              flush=True)

    return serve_ui(tracking_uri, host=args.host, port=args.port, ready=ready)


def _demo(args) -> int:
    from autoprune.driver.search import search
    from autoprune.tracking.select import best

    spec = resources.files("autoprune.search_spaces") / "demo.yaml"
    with resources.as_file(spec) as path:
        outcome = search(path, tracking_uri=args.tracking_uri, workdir=args.workdir, trials=args.trials)
    if not outcome.front:  # nothing registered, so nothing for `best` to choose (it would raise): the summary said why
        return 0
    latencies = [record.result.latency.median_ms for record in outcome.front]
    target = (min(latencies) + max(latencies)) / 2
    choice = best(model=outcome.spec.mlflow.registered_model, max_latency_ms=target, tracking_uri=outcome.tracking_uri)
    print(f"\n$ autoprune best --model {choice.name} --max-latency-ms {target:.3g}")
    print(choice.summary())
    print(f"\nThe front in MLflow's UI: {outcome.ui_hint}")
    return 0


def _methods(args) -> int:
    from autoprune import heal, prune

    for title, registry in (("pruning", prune.PRUNE_METHODS), ("healing", heal.HEAL_METHODS)):
        print(f"{title} methods:")
        for method in registry:
            print(f"  {method.name:<12} {method.description}")
            for option, default in method.options.items():
                choices = method.choices.get(option)
                print(f"  {'':<12}   {option}: {default!r}" + (f"  (one of: {', '.join(choices)})" if choices else ""))
    return 0


def _bench(args) -> int:
    from autoprune.bench.commands import run_bench

    return run_bench(args)


def _doctor(args) -> int:
    from autoprune.doctor import main_doctor

    return main_doctor(args)


def _check(args) -> int:
    from autoprune.check import check_model, table
    from autoprune.models import ModelSource

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as error:
        raise AutopruneError(f"--kwargs: not JSON ({error}): {args.kwargs!r}") from None
    if not isinstance(kwargs, dict):
        raise AutopruneError(f"--kwargs: expected a JSON object, but got {args.kwargs!r}")
    source = ModelSource(args.model, args.num_classes, kwargs)
    echo = None if args.json else (lambda line: print(f"autoprune: {line}", file=sys.stderr))
    from autoprune import heal

    heal_methods = heal.list_methods() if args.heal is None else args.heal
    result = check_model(source, input_size=args.input_size, methods=args.methods, sparsities=args.sparsities,
                         heal_methods=heal_methods, echo=echo)
    print(json.dumps(result.as_dict()) if args.json else table(result))
    return 0


COMMANDS = {"search": _search, "publish": _publish, "retarget": _retarget, "best": _best, "serve": _serve,
            "front": _front, "ui": _ui, "demo": _demo, "methods": _methods, "check": _check, "doctor": _doctor, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
