-- Runs once, when the postgres volume is first initialised (as POSTGRES_USER,
-- who therefore owns it). The sparq job store uses POSTGRES_DB (sparq); MLflow
-- gets a database of its own so their tables never share a schema.
CREATE DATABASE mlflow;
