"""docs/config-reference.md is generated from the schema (shared/config_reference.py) and must be current."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from shared.config_reference import OUTPUT, REGENERATE, reference


def test_committed_reference_is_current():
    committed = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    assert committed == reference(), f"docs/config-reference.md is stale: regenerate it with `{REGENERATE}`"


def _rows(text: str, title: str) -> list[str]:
    """The table rows under the heading ``## title``."""
    block = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in block.splitlines() if line.startswith("| `")]


def test_real_schema_rows():
    text = reference()
    assert "| `trainer.lr` | float | 0.002 | > 0 | AdamW learning rate |" in _rows(text, "trainer")
    assert "| `model.lora.rank` | int | 16 | ≥ 1, ≤ 256 | LoRA rank r |" in _rows(text, "model.lora")
    # a Literal is shown by its choices; a `float | None` field by its bounds and "unset"
    assert any(r.startswith('| `inference.lora_mode` | str | "adapter" | "adapter", "merge" |')
               for r in _rows(text, "inference"))
    assert any(r.startswith("| `trainer.loss.teacher_tau` | float \\| None | unset | ≥ 0 |")
               for r in _rows(text, "trainer.loss"))
    # a list of structs: a row for the list and a section for its items
    assert _rows(text, "orchestrator.teacher_model.context_messages[]")[0].startswith(
        '| `orchestrator.teacher_model.context_messages[].role` | str | "user" | "assistant", "system", "user" |')
    # nested struct fields are sections, not rows of their parent
    assert not any(r.startswith("| `trainer.loss` ") for r in _rows(text, "trainer"))


# A schema shaped as workflow plug-ins may declare theirs: a tagged union of sections, a dict of structs.
class _Judge(Struct, tag_field="kind", tag="judge", forbid_unknown_fields=True, kw_only=True):
    rubric: Annotated[str, Meta(description="judge prompt")] = ""


class _Comparator(Struct, tag_field="kind", tag="comparator", forbid_unknown_fields=True, kw_only=True):
    """Teacher answers as references.

    More prose that the reference leaves out."""

    threshold: Annotated[float, Meta(description="score counted as correct", ge=-1, le=1)] = 0.5


class _Env(Struct, forbid_unknown_fields=True, kw_only=True):
    weight: Annotated[float, Meta(description="mix weight", gt=0)] = 1.0


class _Root(Struct, forbid_unknown_fields=True, kw_only=True):
    steps: Annotated[int, Meta(description="steps", ge=1)] = 3
    mode: Annotated[Literal["a", "b"], Meta(description="a | b")] = "a"
    workflow: Annotated[_Judge | _Comparator, Meta(description="what turns a batch into samples")] = field(
        default_factory=_Judge)
    envs: Annotated[dict[str, _Env], Meta(description="environments by name")] = field(default_factory=dict)


def test_tagged_union_and_dict_of_structs():
    text = reference(_Root)
    assert _rows(text, "top level") == [
        '| `steps` | int | 3 | ≥ 1 | steps |',
        '| `mode` | str | "a" | "a", "b" | a \\| b |',
        '| `workflow` | _Judge \\| _Comparator | {"kind": "judge", "rubric": ""} | kind: "judge", "comparator" '
        '| what turns a batch into samples |',
        '| `envs` | dict[str, _Env] | {} |  | environments by name |',
    ]
    assert _rows(text, 'workflow (kind = "judge")') == ['| `workflow.rubric` | str | "" |  | judge prompt |']
    assert _rows(text, 'workflow (kind = "comparator")') == [
        '| `workflow.threshold` | float | 0.5 | ≥ -1, ≤ 1 | score counted as correct |']
    assert '`workflow` when kind = "comparator": Teacher answers as references.' in text and "More prose" not in text
    assert _rows(text, "envs.<name>") == ['| `envs.<name>.weight` | float | 1.0 | > 0 | mix weight |']
