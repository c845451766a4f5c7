# The MLflow server with the PostgreSQL driver, the S3 client and the basic-auth app's
# extra (Flask-WTF) it needs.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3 "mlflow[auth]==3.17.2"
