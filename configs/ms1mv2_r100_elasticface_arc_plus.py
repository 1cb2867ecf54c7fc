"""MS1MV2, r100, ElasticFace-Arc+ (Boutros et al., CVPRW 2022).

Loss hyper-parameters: fdbtrs/ElasticFace config/config.py for ElasticArcFacePlus (s=64,
m=0.5, std=0.0175). Its schedule: iresnet100, batch 128 per GPU, lr 0.1, 26 epochs (steps at
8, 14, 20, 25), momentum 0.9, weight decay 5e-4 -- here the polynomial schedule over 26 epochs.
The per-sample margins are drawn from a generator seeded with `seed`.
"""
from utils.config import Config

config = Config()
config.loss = "elasticface_arc"
config.loss_params = dict(m=0.5, std=0.0175, plus=True)  # ElasticFace config/config.py
config.margin_scale = 64.0  # ElasticFace config/config.py
config.network = "r100"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9  # ElasticFace config/config.py
config.weight_decay = 5e-4  # ElasticFace config/config.py
config.batch_size = 128  # ElasticFace config/config.py (per GPU)
config.lr = 0.1  # ElasticFace config/config.py
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 26  # ElasticFace config/config.py
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
