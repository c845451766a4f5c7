# The MLflow server with the PostgreSQL driver and the S3 client it needs.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3
