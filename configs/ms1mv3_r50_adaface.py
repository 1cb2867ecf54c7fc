"""MS1MV3, r50, AdaFace (Kim et al., CVPR 2022).

Loss hyper-parameters: mk-minchul/AdaFace main.py defaults (m=0.4, h=0.333, s=64,
t_alpha=0.01), as for its MS1MV3 models; 26 epochs as its scripts. Optimiser, batch and
warm-up are arcface_torch's ms1mv3_r50.
"""
from utils.config import Config

config = Config()
config.loss = "adaface"
config.loss_params = dict(m=0.4, h=0.333, t_alpha=0.01)  # AdaFace README / main.py
config.margin_scale = 64.0  # s, AdaFace main.py
config.network = "r50"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.2  # arcface_torch ms1mv3_r50
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 26  # AdaFace scripts
config.warmup_epoch = 2  # arcface_torch ms1mv3_r50
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
