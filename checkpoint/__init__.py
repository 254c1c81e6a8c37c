"""longctx.checkpoint: checkpoints on disk and the run directory.

store.py        save / verify / resolve / prune / load checkpoints (sha256 manifest,
                temporary directory then rename, ``latest``)
full_state.py   the unsharded fp32 weights, AdamW moments and RNG state of an engine
saved_model.py  a trained model (and its recipe, tokenizer) from a run or checkpoint; HF export
tensor_stream.py  a checkpoint's weights one tensor at a time (what the export streams)
run_dir.py      the checks and files of a run directory (markers, vocabulary, data)
"""
