"""Builds (once) the TFDS dataset a config names and prints how long it took (0 s when already built).

python scripts/build_dataset.py --config=configs/easy_vqa.py
"""

import time

from absl import app
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def main(argv):
    del argv
    from vtfusion_jax import train_lib

    start = time.time()
    meta = train_lib.get_meta(app.flags.FLAGS.config)
    print(f"{meta['builder_dir']}: {meta['num_examples']} ready in {time.time() - start:.1f}s")


if __name__ == "__main__":
    app.run(main)
