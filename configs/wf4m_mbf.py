"""WF4M, mbf: published arcface_torch hyper-parameters."""
from utils.config import Config

config = Config()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "mbf"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace4M"
config.num_classes = 205990
config.num_image = 4235242
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
