"""The compression engine: sparsity, structured pruning, the quantization methods and the
training loops. Pure torch: no Ray, Optuna or MLflow.
"""
