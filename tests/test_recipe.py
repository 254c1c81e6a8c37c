"""The recipe schema: loading, --set overrides, cross-section rules, one-line errors, the hash.

References: the YAML text itself (parsed by PyYAML's plain safe loader), transformers'
configuration and model classes for checkpoint shapes and parameter counts, and explicit
arithmetic for the layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from longctx.config.recipe import Recipe, load_recipe, parse_recipe
from longctx.errors import LongctxError
from longctx.model.config import ModelConfig
from longctx.parallel.config import ParallelConfig

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def recipe_error(raw: dict) -> str:
    """The message of the LongctxError that validating ``raw`` raises (asserted one line)."""
    with pytest.raises(LongctxError) as caught:
        parse_recipe(raw, source="r.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- loading ---------------------------------------------------------------------------------


def test_every_key_of_tiny_yaml_reaches_the_recipe():
    written = yaml.safe_load(TINY.read_text())
    recipe = load_recipe(TINY)

    def compare(section: dict, obj, path: str):
        for key, value in section.items():
            actual = getattr(obj, key) if not isinstance(obj, dict) else obj[key]
            if isinstance(value, dict) and not isinstance(actual, dict):
                compare(value, actual, f"{path}{key}.")
            else:
                # PyYAML 1.1 reads 1e-3 as a string; the recipe loader reads it as a float
                expected = float(value) if isinstance(actual, float) else value
                assert actual == expected, f"{path}{key}"

    compare(written, recipe, "")
    assert recipe.name == "tiny"


def test_name_defaults_to_the_file_stem_and_run_dir_to_runs_name(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "trainer: {steps: 500}\n", "my-run.yaml"))
    assert recipe.name == "my-run"
    assert recipe.trainer.run_dir == "runs/my-run"


def test_resolved_yaml_loads_back_to_an_equal_recipe(tmp_path):
    recipe = load_recipe(TINY, ["model.rope_scaling={rope_type: linear, factor: 2.0}"])
    again = load_recipe(write_recipe(tmp_path, recipe.resolved_yaml()))
    assert again == recipe


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "trainer: {lr: 3e-4, min_lr: 1E-5}\n"))
    assert recipe.trainer.lr == 3e-4
    assert recipe.trainer.min_lr == 1e-5


# --- --set overrides -------------------------------------------------------------------------


def test_set_converts_values_by_yaml_and_schema_types():
    recipe = load_recipe(
        TINY,
        [
            "trainer.lr=3e-4",
            "trainer.steps=7",
            "trainer.activation_checkpointing=true",
            "trainer.betas=[0.8, 0.99]",
            "parallel.ring=2",
            "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 256}",
        ],
    )
    assert recipe.trainer.lr == 3e-4 and isinstance(recipe.trainer.lr, float)
    assert recipe.trainer.steps == 7
    assert recipe.trainer.activation_checkpointing is True
    assert recipe.trainer.betas == (0.8, 0.99)
    assert recipe.parallel.ring == 2
    assert recipe.model.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 256,
    }


def test_set_later_assignment_wins_and_keys_inside_free_form_mappings_are_allowed():
    recipe = load_recipe(
        TINY,
        [
            "trainer.steps=3",
            "trainer.steps=9",
            "model.rope_scaling={rope_type: linear, factor: 2.0}",
            "model.rope_scaling.factor=8.0",
        ],
    )
    assert recipe.trainer.steps == 9
    assert recipe.model.rope_scaling == {"rope_type": "linear", "factor": 8.0}


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("trainer.lr", "has no '='"),
        ("trainer.lrr=1", "did you mean 'trainer.lr'?"),
        ("trainer..lr=1", "empty key part"),
        ("trainer.lr.x=1", "'trainer.lr' itself"),
        ("trainer.lr=[1, 2", "not valid YAML"),
    ],
)
def test_bad_set_is_a_one_line_error(assignment, fragment):
    with pytest.raises(LongctxError) as caught:
        load_recipe(TINY, [assignment])
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


# --- file and YAML errors --------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(LongctxError, match=f"recipe file {missing} does not exist"):
        load_recipe(missing)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(LongctxError, match="is a directory"):
        load_recipe(tmp_path)


def test_yaml_syntax_error_gives_file_line_column_and_problem(tmp_path):
    # line 4 has a second ':' right after a key, which PyYAML rejects at that line
    path = write_recipe(tmp_path, "name: x\ntrainer:\n  lr: 1\n  steps: : 3\n")
    with pytest.raises(LongctxError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4:")
    assert "mapping values are not allowed here" in message
    assert "\n" not in message


def test_duplicate_key_is_an_error_with_its_line(tmp_path):
    path = write_recipe(tmp_path, "trainer:\n  lr: 0.1\n  steps: 2\n  lr: 0.2\n")
    with pytest.raises(LongctxError, match=rf"{path}:4:3: invalid YAML: duplicate key 'lr'"):
        load_recipe(path)


def test_non_utf8_file_is_reported_with_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LongctxError, match=r"is not UTF-8 text \(byte 9\)"):
        load_recipe(path)


def test_unhashable_key_is_a_yaml_error_with_its_line(tmp_path):
    path = write_recipe(tmp_path, "trainer:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(LongctxError, match=rf"{path}:2:\d+: invalid YAML: found unhashable key"):
        load_recipe(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(LongctxError, match="a recipe is a mapping of sections"):
        load_recipe(write_recipe(tmp_path, "- trainer\n- model\n"))


# --- schema errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"trainer": {"lrr": 1}}, "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"),
        (
            {"data": {"tokenizer": {"vocab_sizee": 600}}},
            "unknown key 'data.tokenizer.vocab_sizee'; did you mean 'data.tokenizer.vocab_size'?",
        ),
        ({"lr": 0.1}, "unknown key 'lr'; did you mean 'trainer.lr'?"),
        (
            {"trainer": {"seq_len": 64}},
            "unknown key 'trainer.seq_len'; did you mean 'data.seq_len'?",
        ),
    ],
)
def test_unknown_key_names_dotted_path_and_closest_valid_key(raw, expected):
    assert recipe_error(raw) == f"r.yaml: {expected}"


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    message = recipe_error({"positional": {"zzz": 1}})
    assert (
        message
        == "r.yaml: unknown key 'positional.zzz'; valid keys under 'positional': kind, cope, bam, tapa"
    )


def test_wrong_type_names_field_value_and_expectation():
    message = recipe_error({"trainer": {"steps": "ten"}})
    assert message.startswith("r.yaml: trainer.steps = 'ten' (str) is invalid: ")
    assert "valid integer" in message
    assert "--set trainer.steps=VALUE" in message


def test_out_of_range_names_field_value_and_bound():
    message = recipe_error({"model": {"hidden_size": -64}})
    assert "model.hidden_size = -64 (int) is invalid: input should be greater than 0" in message


def test_union_field_reports_both_alternatives():
    message = recipe_error({"parallel": {"dp": "two"}})
    assert "parallel.dp = 'two' (str)" in message
    assert "valid integer" in message and "'auto'" in message


def test_literal_near_miss_suggests_the_closest_choice():
    message = recipe_error({"model": {"arch": "lama"}})
    assert "model.arch = 'lama'" in message and "did you mean 'llama'?" in message


def test_invalid_mapping_key_suggests_the_closest_choice():
    message = recipe_error({"data": {"tasks": {"paskey": 1.0}}})
    assert "data.tasks has an invalid key 'paskey'" in message
    assert "did you mean 'passkey'?" in message


def test_heads_not_divisible_by_kv_heads():
    raw = {"model": {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 4}}
    message = recipe_error(raw)
    assert "num_attention_heads=6 is not divisible by num_key_value_heads=4" in message


def test_unknown_rope_scaling_type():
    message = recipe_error({"model": {"rope_scaling": {"rope_type": "yarnn", "factor": 4.0}}})
    assert "'yarnn'" in message and "did you mean 'yarn'?" in message


def test_rope_scaling_missing_required_field():
    message = recipe_error({"model": {"rope_scaling": {"rope_type": "linear"}}})
    assert "rope_scaling" in message and "factor" in message


# --- cross-section rules ---------------------------------------------------------------------


def test_rope_needs_an_even_head_dim_but_nope_does_not():
    odd = {"hidden_size": 132, "num_attention_heads": 4}  # head dim 33
    assert "the head dim is 33" in recipe_error({"model": odd})
    recipe = parse_recipe({"model": odd, "positional": {"kind": "none"}})
    assert recipe.model.dim_per_head == 33


def test_ulysses_degree_must_divide_the_heads():
    message = recipe_error({"model": {"num_attention_heads": 4}, "parallel": {"ulysses": 3}})
    assert "num_attention_heads=4 is not divisible by parallel.ulysses=3" in message
    assert "[1, 2, 4]" in message


def test_seq_len_must_split_into_two_zigzag_chunks_per_sp_rank():
    raw = {"data": {"seq_len": 204}, "parallel": {"ring": 2, "ulysses": 2}}
    message = recipe_error(raw)
    assert "data.seq_len=204 is not divisible by 2 x parallel.ulysses x ring = 8" in message
    assert "e.g. 208" in message
    assert parse_recipe({**raw, "data": {"seq_len": 208}}).parallel.sp == 4


def test_trained_tokenizer_must_fit_the_embedding():
    raw = {"model": {"vocab_size": 500}, "data": {"tokenizer": {"vocab_size": 512}}}
    assert "data.tokenizer.vocab_size=512 exceeds model.vocab_size=500" in recipe_error(raw)


@pytest.mark.parametrize(
    ("trainer", "fragment"),
    [
        ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr=0.001 is above lr=0.0001"),
        ({"steps": 10, "warmup_steps": 11}, "warmup_steps=11 exceeds steps=10"),
        ({"betas": [0.9, 1.0]}, "betas=[0.9, 1.0] must each be in [0, 1)"),
        ({"zero_stage": 4}, "trainer.zero_stage = 4 (int) is invalid"),
    ],
)
def test_trainer_rules(trainer, fragment):
    assert fragment in recipe_error({"trainer": trainer})


# --- parallel layout -------------------------------------------------------------------------


def test_auto_dp_follows_the_worker_count():
    layout = ParallelConfig(ulysses=2, ring=2).resolve(8)
    assert (layout.dp, layout.sp, layout.world) == (2, 4, 8)
    assert ParallelConfig(ring=2).resolve(None).world == 2


@pytest.mark.parametrize(
    ("parallel", "workers", "fragment"),
    [
        ({"ring": 2}, 3, "--workers 3 is not a multiple of parallel.ulysses x ring = 1 x 2 = 2"),
        ({"dp": 2, "ring": 2}, 8, "--workers 8 does not match parallel.dp x ulysses x ring"),
    ],
)
def test_worker_count_must_fit_the_layout(parallel, workers, fragment):
    with pytest.raises(LongctxError, match=fragment.replace(".", r"\.")):
        ParallelConfig(**parallel).resolve(workers)


def test_auto_dp_has_no_world_until_resolved():
    with pytest.raises(LongctxError, match="parallel.dp is 'auto'"):
        _ = ParallelConfig().world


# --- recipe hash -----------------------------------------------------------------------------


def test_recipe_hash_is_the_documented_digest_of_the_shape():
    # tiny.yaml's shape, written out by hand; the digest is also pinned as a literal because
    # changing it would make every existing checkpoint refuse to resume
    shape = {
        "model": {
            "arch": "llama",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 172,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "tie_word_embeddings": False,
            "attention_bias": False,
        },
        "positional": {"kind": "rope"},
        "attention": {"variant": "dense"},
    }
    canonical = json.dumps(shape, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert load_recipe(TINY).recipe_hash() == expected == "a2f9f62d86d2bd5a"


def test_recipe_hash_ignores_training_data_parallel_and_kernel_choices():
    base = load_recipe(TINY).recipe_hash()
    changed = load_recipe(
        TINY,
        [
            "trainer.lr=1e-2",
            "data.seq_len=256",
            "parallel.ring=2",
            "attention.backend=reference",
            "model.rope_scaling={rope_type: linear, factor: 2.0}",
        ],
    )
    assert changed.recipe_hash() == base


def test_recipe_hash_treats_derived_and_explicit_kv_heads_and_head_dim_alike():
    implicit = parse_recipe({"model": {"hidden_size": 64, "num_attention_heads": 4}})
    explicit = parse_recipe(
        {
            "model": {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "head_dim": 16,
            }
        }
    )
    assert implicit.recipe_hash() == explicit.recipe_hash()


@pytest.mark.parametrize(
    "assignment",
    [
        "model.hidden_size=128",
        "model.num_key_value_heads=4",
        "model.tie_word_embeddings=true",
        "positional.kind=none",
    ],
)
def test_recipe_hash_changes_with_the_model_shape(assignment):
    assert load_recipe(TINY, [assignment]).recipe_hash() != load_recipe(TINY).recipe_hash()


# --- parameter count and hf: init, against transformers ------------------------------------


@pytest.mark.parametrize(("arch", "bias", "tied"), [("llama", False, False), ("qwen2", True, True)])
def test_num_parameters_matches_transformers(arch, bias, tied):
    import transformers

    fields = dict(
        vocab_size=203,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    hf_class = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    hf_config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    extra = {"attention_bias": True} if arch == "llama" and bias else {}
    hf_model = hf_class(hf_config_class(**fields, **extra))
    ours = ModelConfig(arch=arch, attention_bias=bias, **fields)
    assert ours.num_parameters() == hf_model.num_parameters()


def _save_hf_config(directory: Path) -> None:
    import transformers

    transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
    ).save_pretrained(directory)


def test_hf_init_takes_the_shape_from_config_json_and_keeps_recipe_rope(tmp_path):
    _save_hf_config(tmp_path / "ckpt")
    recipe = parse_recipe(
        {
            "model": {
                "init": f"hf:{tmp_path / 'ckpt'}",
                "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                "max_position_embeddings": 2048,
            },
            "data": {"tokenizer": {"vocab_size": 320}},
        }
    )
    model = recipe.model
    shape = (
        model.vocab_size,
        model.hidden_size,
        model.intermediate_size,
        model.num_hidden_layers,
        model.num_attention_heads,
        model.kv_heads,
    )
    assert shape == (320, 96, 160, 3, 6, 2)
    assert model.rope_theta == 50000.0
    assert model.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert model.max_position_embeddings == 2048


def test_hf_init_reports_conflicting_shape_fields(tmp_path):
    _save_hf_config(tmp_path / "ckpt")
    message = recipe_error(
        {"model": {"init": f"hf:{tmp_path / 'ckpt'}", "hidden_size": 128, "num_hidden_layers": 3}}
    )
    assert "hidden_size=128 (checkpoint: 96)" in message
    assert "num_hidden_layers" not in message  # equal to the checkpoint's value: no conflict


def test_hf_init_with_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    message = recipe_error({"model": {"init": f"hf:{missing}"}})
    assert f"{missing} directory does not exist" in message


def test_recipe_defaults_are_valid():
    assert Recipe().trainer.run_dir == "runs/run"
