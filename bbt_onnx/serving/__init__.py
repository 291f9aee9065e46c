"""The service's side: `bbt-onnx serve` (a real Triton server in this process), the model repository for a stock
tritonserver (`triton-repo`), and the load test of a served model (`bench --server`). It imports `engines`; nothing
in `engines` imports it."""
