"""Data: TFDS builders (easy_vqa, sort_of_clevr, manifest), WordPiece tokenizer, sharded input pipeline.

Entry points: `pipeline.make_train_iterator`, `pipeline.make_eval_iterator`, `pipeline.dataset_meta`,
`tokenizer.Tokenizer`. Submodules are imported explicitly (importing this package loads neither TFDS nor jax).
"""
