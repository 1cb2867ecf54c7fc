"""MS1MV2, r100, AdaFace (Kim et al., CVPR 2022).

Loss hyper-parameters: mk-minchul/AdaFace main.py defaults and scripts/run_ir50_ms1mv2.sh
(m=0.4, h=0.333, s=64, t_alpha=0.01); its schedule is lr 0.1 for 26 epochs (steps at 12, 20,
24), here lr 0.1 over 26 epochs on this project's polynomial schedule. Everything else is
arcface_torch's ms1mv2_r100.
"""
from utils.config import Config

config = Config()
config.loss = "adaface"
config.loss_params = dict(m=0.4, h=0.333, t_alpha=0.01)  # AdaFace README / main.py
config.margin_scale = 64.0  # s, AdaFace main.py
config.network = "r100"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1  # AdaFace scripts/run_ir50_ms1mv2.sh
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 26  # AdaFace scripts/run_ir50_ms1mv2.sh
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
