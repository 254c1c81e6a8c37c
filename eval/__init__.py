"""longctx.eval: long-context evaluation of a model (perplexity by position, passkey and needle
grids, algorithmic task accuracy) and its reports (JSON, PNG heatmaps, TensorBoard).

    evaluate.py        perplexity by position bucket, passkey / needle scoring
    sequence_scorer.py per-token NLL of whole sequences, sharded over an SP mesh when given
    task_accuracy.py   exact / token accuracy of generated algorithmic tasks
    report.py          the evaluation plan of a recipe and its JSON / PNG / TensorBoard output
    passkey_check.py   the passkey line ``longctx train`` prints at the end of a local run, the
                       before / after table rows of a staged run (95% Wilson intervals)
"""
