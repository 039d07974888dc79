"""Joining Ray: a local instance, or a cluster at `--address`, with Ray's failures to connect said in one line.

Four set-up mistakes have one fix each, and Ray reports them late and long: nothing listens at the address, or
something other than Ray does (Ray waits 40 s), the cluster uses token authentication (Ray's default once a token exists, and
cluster/onprem.yaml's) and this client has no token (20 s of retries, a warning a second, then a traceback), or
this client runs another Ray or Python version than the cluster. Each is an error naming the fix, before anything
else runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from autoprune.errors import AutopruneError

GCS_ANSWER_S = 10.0  # a cluster's GCS answers in well under a second; what takes longer is not one


def start_ray(address: str | None, *, logging_level: int = logging.WARNING):
    """`ray`, initialised: a new local instance when `address` is None, else the cluster at `address` ("auto": the
    one running on this machine). Worker output stays in Ray's logs: trial errors reach the user through the
    progress lines and MLflow."""
    import ray

    # An address given is checked even when this process already runs a Ray: an address where nothing (or no Ray)
    # answers is the user's mistake to hear about, whatever ran before in the same process.
    check_address(address)
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging_level)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError or its own AuthenticationError
        why = _why_not(address, error)
        if why is None:
            raise
        raise AutopruneError(why) from error
    return ray


def check_address(address: str | None) -> None:
    """Fail in a second, not after Ray's retries (20 s and more, a warning a second): nothing listens at `address`,
    or its GCS refuses this client for want of the cluster's token. (A local Ray, "auto" and ray:// are left to
    ray.init.)"""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return  # not HOST:PORT; ray.init says what it makes of it
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise AutopruneError(f"nothing answers at {address} ({error.strerror or error}): is the Ray cluster up?"
                             " (`ray status` on its head says)") from None
    from ray._raylet import GcsClient  # Ray's own GCS client: asks for the cluster's id, with the token if any

    outcome: list[Exception | None] = []

    def probe() -> None:
        try:
            GcsClient(address=address)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 — judged below
            outcome.append(error)

    # In a thread, as Ray's client waits 40 s for a port where something else answers (it has no timeout to set)
    thread = threading.Thread(target=probe, daemon=True)
    with _stderr_silenced():  # Ray's C++ client logs each refusal there before it raises
        thread.start()
        thread.join(GCS_ANSWER_S)
    if not outcome:
        raise AutopruneError(f"something answers at {address}, but no Ray cluster within {GCS_ANSWER_S:g} s: is it"
                             " the head's port (6379 unless its `ray start --port` says otherwise)?")
    if outcome[0] is not None and _refused_for_token(outcome[0]):
        raise AutopruneError(_token_message(address))
    # anything else is left to ray.init to report


@contextlib.contextmanager
def _stderr_silenced():
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _refused_for_token(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a GCS refusing a client without the cluster's token: Ray
    raises its AuthenticationError, or, from ray.init, a ConnectionError over a RuntimeError that quotes it."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _token_message(address: str | None) -> str:
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    return (f"{where} refused this client: it uses token authentication. Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
            " to the cluster's token (`ray get-auth-token` on its head prints it), or run the command on the head"
            " (`ray exec CLUSTER.yaml \"autoprune …\"`).")


def _why_not(address: str | None, error: Exception) -> str | None:
    """The one line that says why Ray could not be joined; None for a local Ray that failed to start (its
    traceback is the report)."""
    if _refused_for_token(error):
        return _token_message(address)
    if address is None:
        return None
    where = f"the Ray cluster at {address}"
    text = " ".join(str(error).split())
    if "Version mismatch" in text:
        return (f"{where} runs another Ray or Python version than this machine ({text.split(': ', 1)[-1]})."
                " Install the cluster's versions here, or run the command on the head.")
    return f"cannot join {where}: {text[:300] or type(error).__name__}"
