"""longctx.checkpoint: checkpoints on disk and the run directory.

store.py          save / verify / resolve / prune / load checkpoints (sha256 manifest,
                  temporary directory then rename, ``latest``)
sharded_state.py  each rank's fragments of the fp32 weights and AdamW moments (safetensors +
                  JSON index), resharded on restore; the model's tensors one at a time
full_state.py     RNG state, data cursor and counters in layout-free, pickle-free form
saved_model.py    a trained model (and its recipe, tokenizer) from a run or checkpoint; HF export
run_dir.py        the checks and files of a run directory (markers, vocabulary, data)
"""
