import json

import pytest

from utils.config import REPO_ROOT, Config, ConfigError, load_config, save_config

INSIGHTFACE_KEYS = (
    "network margin_list embedding_size sample_rate interclass_filtering_threshold fp16 batch_size "
    "optimizer lr momentum weight_decay verbose frequent dali gradient_acc seed num_workers resume "
    "save_all_states output rec num_classes num_image num_epoch warmup_epoch val_targets"
).split()
SHIPPED = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "base"))


def test_base_keeps_every_insightface_key():
    cfg = load_config("configs/base.py")
    for key in INSIGHTFACE_KEYS:
        assert key in cfg, key


def test_the_standard_experiments_are_shipped():
    expected = {
        "ms1mv2_mbf", "ms1mv2_r50", "ms1mv2_r100", "ms1mv3_mbf", "ms1mv3_r18", "ms1mv3_r34", "ms1mv3_r50",
        "ms1mv3_r100", "glint360k_mbf", "glint360k_r50", "glint360k_r100", "wf4m_mbf", "wf4m_r50", "wf4m_r100",
        "wf12m_r50", "wf12m_r100", "wf12m_pfc02_r100", "wf42m_pfc02_r100", "wf42m_pfc03_40epoch_8gpu_vit_b",
    }
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(f"configs/{name}")
    assert cfg.output == f"work_dirs/{name}"
    assert cfg.config_name == name


def test_published_hyper_parameters():
    r50 = load_config("configs/ms1mv3_r50")
    assert (r50.network, r50.margin_list, r50.num_classes, r50.num_image) == ("r50", (1.0, 0.5, 0.0), 93431, 5179510)
    glint = load_config("configs/glint360k_r100")
    assert glint.margin_list == (1.0, 0.0, 0.4) and glint.num_classes == 360232
    vit = load_config("configs/wf42m_pfc03_40epoch_8gpu_vit_b")
    assert (vit.optimizer, vit.lr, vit.sample_rate, vit.gradient_acc) == ("adamw", 0.001, 0.3, 12)


@pytest.mark.parametrize("form", ["configs/ms1mv3_r50", "configs/ms1mv3_r50.py", "ms1mv3_r50"])
def test_config_path_forms(form):
    assert load_config(form).config_name == "ms1mv3_r50"


def test_config_anywhere_on_disk_and_insightface_easydict_style(tmp_path):
    path = tmp_path / "my_experiment.py"
    path.write_text(
        "from easydict import EasyDict as edict\n"
        "config = edict()\n"
        "config.margin_list = (1.0, 0.0, 0.4)\n"
        "config.network = 'r18'\n"
        "config.resume = None\n"
        "config.using_wandb = False\n"
        "config.rec = '/data/faces'\n"
        "config.num_classes = 10\n"
        "config.num_image = 100\n"
        "config.num_epoch = 2\n"
        "config.warmup_epoch = config.num_epoch // 10\n"
        "config.val_targets = ['lfw']\n"
    )
    cfg = load_config(str(path))
    assert (cfg.network, cfg.rec, cfg.margin_list) == ("r18", "/data/faces", (1.0, 0.0, 0.4))
    assert cfg.output == "work_dirs/my_experiment"
    assert cfg.batch_size == 128  # from base


def test_overrides_parse_python_literals():
    cfg = load_config(
        "configs/ms1mv3_r50",
        ["--network=r18", "--batch_size=8", "--lr=0.05", "--margin_list=(1.0,0.0,0.35)", "--val_targets=[]",
         "--rec=/data/x y", "--resume", "--output=work_dirs/smoke", "--sample_rate=1"],
    )
    assert (cfg.network, cfg.batch_size, cfg.lr, cfg.margin_list) == ("r18", 8, 0.05, (1.0, 0.0, 0.35))
    assert cfg.val_targets == [] and cfg.rec == "/data/x y" and cfg.resume is True
    assert cfg.output == "work_dirs/smoke" and cfg.sample_rate == 1.0 and isinstance(cfg.sample_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--batch_sise=8", "unknown config key 'batch_sise'; did you mean 'batch_size'?"),
        ("--batch_size=abc", "key 'batch_size' expects int, got 'abc'"),
        ("--batch_size=True", "key 'batch_size' expects int"),
        ("--lr=fast", "key 'lr' expects float or int"),
        ("--decay_epoch=8", "'decay_epoch' is no longer supported: the learning rate follows the PolyScheduler"),
        ("--sample_rate=0", "sample_rate must be in (0, 1]"),
        ("--optimizer=adam", "optimizer must be 'sgd' or 'adamw'"),
        ("--margin_list=(1.0,0.5)", "margin_list must be three numbers"),
        ("network=r50", "expected --key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/ms1mv3_r50", [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_key_in_a_config_module_names_file_key_and_closest(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("config = dict(netwrok='r50')\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'netwrok'; did you mean 'network'\?"):
        load_config(str(path))


def test_missing_file_and_missing_config_object(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: configs/nope"):
        load_config("configs/nope")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="does not define `config`"):
        load_config(str(empty))
    broken = tmp_path / "broken.py"
    broken.write_text("config = dict(\n")
    with pytest.raises(ConfigError, match="error while executing config file .*broken.py: SyntaxError"):
        load_config(str(broken))


def test_config_json_round_trip(tmp_path):
    cfg = load_config("configs/ms1mv3_r50", ["--network=r18"])
    save_config(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["network"] == "r18" and data["margin_list"] == [1.0, 0.5, 0.0]


def test_config_is_attribute_and_item_accessible():
    c = Config(a=1)
    c.b = 2
    assert c["b"] == 2 and c.a == 1
    with pytest.raises(AttributeError):
        c.missing
