# mlflow server with what the compose file needs: PostgreSQL driver, S3 client, basic-auth app.
FROM python:3.12-slim
RUN pip install --no-cache-dir "mlflow[auth]>=3.0" psycopg2-binary boto3
EXPOSE 5000
