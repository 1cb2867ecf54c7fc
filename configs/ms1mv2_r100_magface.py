"""MS1MV2, r100, MagFace (Meng et al., CVPR 2021).

Loss hyper-parameters: IrvingMeng/MagFace run/run.sh (l_a=10, u_a=110, l_margin=0.45,
u_margin=0.8, lambda_g=35, arc-scale 64) with its trainer.py (loss = CE + lambda_g * mean g).
Its schedule: global batch 512, lr 0.1, 25 epochs (steps at 10, 18, 22), SGD momentum 0.9,
weight decay 5e-4 -- here 4 x 128 per process and the polynomial schedule over 25 epochs.
"""
from utils.config import Config

config = Config()
config.loss = "magface"
config.loss_params = dict(l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)  # MagFace run/run.sh
config.margin_scale = 64.0  # --arc-scale 64, MagFace run/run.sh
config.network = "r100"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9  # MagFace run/run.sh
config.weight_decay = 5e-4  # MagFace run/run.sh
config.batch_size = 128  # x 4 processes = MagFace's batch of 512
config.lr = 0.1  # MagFace run/run.sh
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742  # --last-fc-size 85742, MagFace run/run.sh
config.num_image = 5822653
config.num_epoch = 25  # MagFace run/run.sh
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
