"""Export for deployment: the exportable graph, the ONNX / torch.export writer, the NumPy post-processing."""
