"""The CPU demo (`make demo`): MobileFaceNet on synthetic faces, verified on held-out identities.

The data set is drawn on the first run (a few seconds, no download) into `rec` and
reused afterwards; see dataset/synthetic_faces.py and, for a look at the faces,
tools/make_synthetic_faces.py. The verification set `synthetic_val.bin` holds
identities that are not in the training set, so its accuracy is open-set face
verification. It is evaluated before the first step, during training and at the end,
and the log ends with both figures.
"""
from utils.config import Config

config = Config()
config.network = "mbf"
config.embedding_size = 128
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.margin_scale = 32.0  # s = 64 is for hundreds of thousands of classes; 100 need less

# 100 identities x 48 photos: with this few steps, more photos of fewer people generalise
# better to new people than the other way round (measured: 300 x 16 and 50 x 96 do worse).
config.rec = "data/synthetic_faces"
config.synthetic_faces = dict(
    num_identities=100, images_per_identity=48, num_val_identities=100, num_val_pairs=300, seed=0, variation=0.6,
)
config.val_targets = ["synthetic_val"]
config.eval_at_start = True

# One epoch of 300 small steps: on a CPU, more updates of a small batch learn faster than
# fewer large ones for the same number of images.
config.batch_size = 16
config.optimizer = "adamw"
config.lr = 2e-3
config.weight_decay = 0.05
config.num_epoch = 1
config.warmup_epoch = 0
config.frequent = 20
config.verbose = 150  # evaluate half-way (and before the first and after the last step)
config.num_workers = 0  # decoding 16 small JPEGs per step costs less than a worker process
config.save_every_steps = 0
config.output = "work_dirs/demo"
