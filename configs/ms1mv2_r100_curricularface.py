"""MS1MV2, r100, CurricularFace (Huang et al., CVPR 2020).

Loss hyper-parameters: HuangYG123/CurricularFace head/metrics.py (m=0.5, s=64; t's EMA weight
0.01 is fixed). Its config.py: IR_101, global batch 512, lr 0.1, 24 epochs (steps at 10, 18,
22), momentum 0.9, weight decay 5e-4 -- here 4 x 128 per process and the polynomial schedule
over 24 epochs.
"""
from utils.config import Config

config = Config()
config.loss = "curricularface"
config.loss_params = dict(m=0.5)  # CurricularFace head/metrics.py
config.margin_scale = 64.0  # s, CurricularFace head/metrics.py
config.network = "r100"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9  # CurricularFace config.py
config.weight_decay = 5e-4  # CurricularFace config.py
config.batch_size = 128  # x 4 processes = CurricularFace's BATCH_SIZE 512
config.lr = 0.1  # CurricularFace config.py
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 24  # CurricularFace config.py
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
