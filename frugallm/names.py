"""The file and folder names of frugallm's on-disk layouts, defined once (docs/architecture.md).

A room at the bottom, importing nothing: the layouts (formats/) use them, and so does io.py, which
tells a training run or an older quantized export from a foreign directory before it writes.

A run directory holds CONFIG, TRAIN_CONFIG, the tokenizer (tokenizer.py TOKENIZER), metrics.jsonl and
CHECKPOINTS/step_NNNNNNN/; a checkpoint, a quantized export and a Hugging Face export each hold CONFIG and
WEIGHTS (a Hugging Face directory's CONFIG is its own format: formats/hf.py).
"""

CHECKPOINTS = "checkpoints"  # a run's folder of checkpoints
CONFIG = "config.json"  # ModelConfig (frugallm layouts) or the Hugging Face config
TRAIN_CONFIG = "train_config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
QUANTIZATION = "quantization.json"  # a quantized export's metadata (formats/quantized.py)
