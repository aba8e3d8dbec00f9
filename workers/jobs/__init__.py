"""What one trial or the baseline does, and the checkpoint and ONNX export it writes. No
Ray, Optuna or MLflow.
"""
