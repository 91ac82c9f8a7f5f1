import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

import configurator
from configurator import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    format_config,
    parse_args,
    parse_args_or_exit,
    read_config_file,
)


@dataclass
class Cfg:
    n_layer: int = 12
    lr: float = 3e-4
    compile: bool = False
    out_dir: str = "out"
    max_iters: Optional[int] = None
    init_from: str | None = None
    dtype: str = field(default="bfloat16", metadata={"choices": ("float32", "bfloat16", "float16"), "help": "training precision"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})

    def __post_init__(self) -> None:
        if self.n_layer % self.n_head:
            raise ValueError(f"n_layer={self.n_layer} must be a multiple of n_head={self.n_head}")


def write(tmp_path: Path, text: str, name: str = "cfg.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults():
    assert parse_args(Cfg, []) == Cfg()
    assert parse_args(Cfg, []).lr == 3e-4


def test_file_sets_values_and_skips_private_modules_functions(tmp_path):
    path = write(
        tmp_path,
        '"""A preset."""\nimport math\n# twelve layers\nn_layer = 8\n_scratch = 3\n'
        "def helper():\n    return 1\nclass Thing:\n    pass\nout_dir = 'out-ru'\n",
    )
    assert read_config_file(path) == {"n_layer": 8, "out_dir": "out-ru"}
    cfg = parse_args(Cfg, [path])
    assert (cfg.n_layer, cfg.out_dir, cfg.lr) == (8, "out-ru", 3e-4)


def test_computed_values_in_file(tmp_path):
    path = write(tmp_path, "n_head = 2\nn_layer = 4 * n_head\nlr = 6e-4 / 2\n")
    cfg = parse_args(Cfg, [path])
    assert (cfg.n_layer, cfg.n_head, cfg.lr) == (8, 2, 3e-4)


def test_overrides_after_file_win_in_order(tmp_path):
    path = write(tmp_path, "n_layer = 8\nlr = 1e-3\n")
    cfg = parse_args(Cfg, ["--n_layer=16", path, "--lr=2e-3", "--n_layer=20"])
    assert (cfg.n_layer, cfg.lr) == (20, 2e-3)


def test_files_apply_in_order(tmp_path):
    a = write(tmp_path, "n_layer = 8\nout_dir = 'a'\n", "a.py")
    b = write(tmp_path, "n_layer = 16\n", "b.py")
    cfg = parse_args(Cfg, [a, b])
    assert (cfg.n_layer, cfg.out_dir) == (16, "a")


def test_float_field_accepts_int():
    cfg = parse_args(Cfg, ["--lr=1"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


@pytest.mark.parametrize("raw, shown", [("1.5", "1.5 (float)"), ("abc", "'abc' (str)"), ("True", "True (bool)")])
def test_int_field_rejects_wrong_types(raw, shown):
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, [f"--n_layer={raw}"])
    assert str(err.value) == f"config key 'n_layer' in the command line must be int, got {shown}"


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "compile = 1\n")
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, [path])
    assert str(err.value) == f"config key 'compile' in {path} must be bool, got 1 (int)"


def test_bool_parsing_and_bare_flag():
    assert parse_args(Cfg, ["--compile"]).compile is True
    assert parse_args(Cfg, ["--compile=True"]).compile is True
    assert parse_args(Cfg, ["--compile=true"]).compile is True
    assert parse_args(Cfg, ["--compile", "--compile=false"]).compile is False
    assert parse_args(Cfg, ["--compile=False"]).compile is False
    with pytest.raises(ConfigError, match=r"'compile' in the command line must be bool, got 'yes' \(str\)"):
        parse_args(Cfg, ["--compile=yes"])
    with pytest.raises(ConfigError, match="must be bool, got 1 \\(int\\)"):
        parse_args(Cfg, ["--compile=1"])


def test_bare_flag_on_non_bool_key_asks_for_a_value():
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, ["--lr"])
    assert str(err.value) == "--lr needs a value; write --lr=VALUE"


def test_optional_fields_take_none_and_values():
    cfg = parse_args(Cfg, ["--max_iters=100", "--init_from=resume"])
    assert (cfg.max_iters, cfg.init_from) == (100, "resume")
    cfg = parse_args(Cfg, ["--max_iters=None", "--init_from=None"])
    assert (cfg.max_iters, cfg.init_from) == (None, None)
    with pytest.raises(ConfigError, match=r"'max_iters' in the command line must be Optional\[int\], got 'ten'"):
        parse_args(Cfg, ["--max_iters=ten"])


def test_str_fallback_for_unquoted_strings():
    cfg = parse_args(Cfg, ["--out_dir=out-ru", "--dtype=float16"])
    assert (cfg.out_dir, cfg.dtype) == ("out-ru", "float16")
    assert parse_args(Cfg, ["--out_dir='quoted'"]).out_dir == "quoted"
    assert parse_args(Cfg, ["--out_dir=2024"]).out_dir == "2024"  # a number stays text for a str key
    assert parse_args(Cfg, ["--out_dir=None"]).out_dir == "None"  # out_dir may not be None


def test_choices_name_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, ["--dtype=fp8"])
    assert str(err.value) == "config key 'dtype' in the command line must be one of 'float32', 'bfloat16', 'float16', got 'fp8'"


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = write(tmp_path, "n_layers = 6\n")
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, [path])
    assert str(err.value) == f"unknown config key 'n_layers' in {path}; did you mean 'n_layer'?"


def test_unknown_key_on_cli_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, ["--out-dir=x"])
    assert str(err.value) == "unknown config key 'out-dir' in the command line; did you mean 'out_dir'?"
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, ["--zzzz=1"])
    assert str(err.value) == "unknown config key 'zzzz' in the command line; run with --help to list the valid keys"


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, [missing])
    assert str(err.value) == f"config file '{missing}' not found; check the path (presets live in config/)"


def test_positional_that_is_not_py():
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, ["config/small.yaml"])
    assert str(err.value) == "unexpected argument 'config/small.yaml'; pass a config file ending in .py or --key=value"
    with pytest.raises(ConfigError, match="is not a .py file"):
        read_config_file("config/small.yaml")


def test_broken_config_file_reports_line(tmp_path):
    path = write(tmp_path, "n_layer = 8\nlr = undefined_name\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value) == f"config file '{path}' line 2 failed: NameError: name 'undefined_name' is not defined"


def test_post_init_errors_become_config_errors(tmp_path):
    path = write(tmp_path, "n_layer = 6\n")
    with pytest.raises(ConfigError) as err:
        parse_args(Cfg, [path])
    assert str(err.value) == f"invalid config from {path}: n_layer=6 must be a multiple of n_head=4"
    # built once from the merged values, so a later override can fix what a file left invalid
    assert parse_args(Cfg, [path, "--n_head=3"]).n_layer == 6


def test_apply_overrides_returns_new_checked_instance():
    base = Cfg()
    cfg = apply_overrides(base, {"n_layer": 16, "lr": 1}, "checkpoint")
    assert (cfg.n_layer, cfg.lr, base.n_layer) == (16, 1.0, 12)
    with pytest.raises(ConfigError) as err:
        apply_overrides(base, {"n_layers": 16}, "checkpoint")
    assert str(err.value) == "unknown config key 'n_layers' in checkpoint; did you mean 'n_layer'?"
    with pytest.raises(ConfigError) as err:
        apply_overrides(base, {"n_layer": 10}, "checkpoint")
    assert str(err.value) == "invalid config from checkpoint: n_layer=10 must be a multiple of n_head=4"


def test_help_lists_keys_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Cfg, ["--n_layer=3", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("--n_layer", "--lr", "--compile", "--out_dir", "--max_iters", "--init_from", "--dtype", "--n_head"):
        assert key in out
    dtype_row = next(line for line in out.splitlines() if "--dtype" in line)
    assert dtype_row.split()[:3] == ["--dtype", "str", "'bfloat16'"]
    assert "training precision (one of 'float32', 'bfloat16', 'float16')" in dtype_row
    assert "Optional[int]" in out and "attention heads" in out
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Cfg, ["-h"])
    assert exit_info.value.code == 0


def test_parse_args_or_exit_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args_or_exit(Cfg, ["--n_layers=6"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: unknown config key 'n_layers' in the command line; did you mean 'n_layer'?\n"
    assert parse_args_or_exit(Cfg, ["--n_layer=8"]).n_layer == 8


def test_config_to_dict_is_json_safe():
    cfg = parse_args(Cfg, ["--max_iters=5"])
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["max_iters"] == 5 and d["init_from"] is None and d["lr"] == 3e-4
    assert Cfg(**d) == cfg
    assert config_to_dict(apply_overrides(cfg, {"out_dir": "x"}, "test"))["out_dir"] == "x"


def test_config_to_dict_stringifies_unusual_values():
    @dataclass
    class WithPath:
        root: object = Path("data/ru")
        sizes: tuple = (1, 2)

    assert json.dumps(config_to_dict(WithPath())) == '{"root": "data/ru", "sizes": [1, 2]}'


def test_format_config_aligns_keys():
    lines = format_config(Cfg()).splitlines()
    assert lines[0] == "n_layer   = 12"
    assert "out_dir   = 'out'" in lines
    assert "max_iters = None" in lines
    assert len({line.index("=") for line in lines}) == 1


def test_config_file_cannot_pollute_caller_globals(tmp_path):
    path = write(tmp_path, "parse_args = None\nConfigError = 1\nsys = None\nn_layer = 8\n")
    values = read_config_file(path)
    assert values == {"parse_args": None, "ConfigError": 1, "sys": None, "n_layer": 8}
    assert configurator.parse_args is parse_args and callable(parse_args)
    assert configurator.ConfigError is ConfigError and globals()["sys"] is sys
    with pytest.raises(ConfigError, match="unknown config key 'parse_args'"):
        parse_args(Cfg, [path])


def test_data_dir_mixtures_from_the_command_line_and_from_a_config_file(tmp_path):
    from configurator import TrainConfig

    cli = parse_args(TrainConfig, ["--data_dir=data/fineweb2_ru:0.8,data/ru_books:0.2"])
    assert cli.data_dir == "data/fineweb2_ru:0.8,data/ru_books:0.2"
    assert cli.data_sources() == [("data/fineweb2_ru", 0.8), ("data/ru_books", 0.2)]
    # a bare path weighs 1, weights are normalised, a colon that is no weight stays in the path
    assert parse_args(TrainConfig, ["--data_dir=data/a, data/b:3"]).data_sources() == [("data/a", 0.25), ("data/b", 0.75)]
    assert parse_args(TrainConfig, ["--data_dir=C:\\data"]).data_sources() == [("C:\\data", 1.0)]
    assert TrainConfig().data_sources() == [("data/demo", 1.0)]
    # a config file's list of (path, weight) pairs is the same mixture, kept as the string form
    path = write(tmp_path, "data_dir = [('data/fineweb2_ru', 4), ('data/ru_books', 1)]\n")
    cfg = parse_args(TrainConfig, [path])
    assert cfg.data_dir == "data/fineweb2_ru:4.0,data/ru_books:1.0"
    assert cfg.data_sources() == [("data/fineweb2_ru", 0.8), ("data/ru_books", 0.2)]
    assert parse_args(TrainConfig, [write(tmp_path, "data_dir = ['data/x']\n")]).data_dir == "data/x"
    assert TrainConfig(**config_to_dict(cfg)) == cfg  # config.json and checkpoints round-trip it


@pytest.mark.parametrize("value, message", [
    ("--data_dir=data/a:0,data/b", "data_dir gives data/a the weight 0.0; weights must be positive numbers"),
    ("--data_dir=data/a:-1", "data_dir gives data/a the weight -1.0; weights must be positive numbers"),
    ("--data_dir=data/a,,data/b", "data_dir 'data/a,,data/b' has an empty entry; write it as 'data/a:0.8,data/b:0.2'"),
    ("--data_dir=data/a:1,data/a:2", "data_dir names data/a twice; give each dataset once, with its whole weight"),
    ("--data_dir=[('data/a', 'much')]", "data_dir entry ('data/a', 'much') is not a path or a (path, weight) pair"),
])
def test_a_bad_mixture_is_one_line_naming_the_problem(value, message, capsys):
    from configurator import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        parse_args_or_exit(TrainConfig, [value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: invalid config from the command line: {message}\n"
