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
config.margin_scale = 32.0

config.rec = "data/synthetic_faces"
config.synthetic_faces = dict(
    num_identities=300, images_per_identity=16, num_val_identities=100, num_val_pairs=300, seed=0,
)
config.val_targets = ["synthetic_val"]
config.eval_at_start = True

config.batch_size = 32
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 1
config.warmup_epoch = 0
config.frequent = 10
config.verbose = 75  # evaluate half-way
config.num_workers = 0
config.save_every_steps = 0
config.output = "work_dirs/demo"
