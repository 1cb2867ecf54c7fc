"""WF12M, r100: published arcface_torch hyper-parameters."""
from utils.config import Config

config = Config()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []
