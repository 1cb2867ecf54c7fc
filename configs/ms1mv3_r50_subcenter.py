"""MS1MV3, r50, sub-center ArcFace (Deng et al., ECCV 2020): K=3 sub-centres per class.

K=3 and the ArcFace margin (m=0.5, s=64) as in the paper and insightface's mxnet
sub-center ArcFace; everything else is arcface_torch's ms1mv3_r50. After
training, tools/subcenter_noise.py lists the samples more than 75 degrees from their
class's dominant sub-centre (the paper's cleaning step).
"""
from utils.config import Config

config = Config()
config.loss = "arcface"
config.loss_params = dict(m=0.5)  # Sub-center ArcFace paper
config.num_subcenters = 3  # Sub-center ArcFace paper (K=3)
config.margin_scale = 64.0
config.network = "r50"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.2
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 25
config.warmup_epoch = 2
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
