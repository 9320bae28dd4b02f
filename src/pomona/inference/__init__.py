"""Using a finished run: its folder (`runfolder`: run.json, weights, last.pt), the run loaded to predict
(`loaded.load_run` -> `LoadedRun`, the engine choice and its parity gate), batched threaded inference (`engine`),
ONNX (`onnx_io`), photos to predictions and scores (`predict`) and exports (`export`). Never imports training."""
