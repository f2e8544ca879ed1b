"""Teacher log-probs across vocabularies (shared/align.py, orchestrator/vocabulary.py): hand-worked groups and
numbers on real tokenizers (the tiny pair's characters, the letter-pair teacher's, a byte-level BPE); no model."""

import pytest

from orchestrator import vocabulary
from orchestrator.prompts import ChatIds
from shared import align
from shared.align import Group
from shared.builders import tiny_cross_vocab, tiny_pair
from shared.config import ConfigError, load


@pytest.fixture(scope="module")
def chars():
    return tiny_pair.build_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    return tiny_cross_vocab.build_tokenizer()


def byte_level(merges=()):
    """A byte-level BPE (GPT-2 style): one token per byte, plus ``merges`` of byte symbols."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*symbols, *(a + b for a, b in merges), "<eos>"])}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)


def cfg(*argv):
    return load(["--teacher.vocabulary", "align", *argv])


def aligned(s_tok, t_tok):
    return vocabulary.Aligned(cfg(), "", "", s_tok, t_tok)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# -- the pure mapping ---------------------------------------------------------------------------------------
def test_merged_pairs_against_single_characters():
    # student d|c|b|a ends at 1,2,3,4; teacher dc|ba at 2,4: two groups of 2 student tokens : 1 teacher token
    groups = align.group([1, 2, 3, 4], [2, 4])
    assert groups == [Group(0, 2, 0, 1), Group(2, 4, 1, 2)]
    s_lp, t_lp = [-0.1, -0.2, -0.3, -0.4], [-1.0, -0.5]
    # group 1: S = -0.3, T = -1.0, share (T - S)/2 = -0.35; group 2: S = -0.7, T = -0.5, share +0.1
    out = align.spread(groups, t_lp, s_lp)
    assert out == pytest.approx([-0.45, -0.55, -0.2, -0.3])
    assert sum(out[:2]) == pytest.approx(-1.0) and sum(out[2:]) == pytest.approx(-0.5)  # each group sums to T_G
    kl = [s - t for s, t in zip(s_lp, out)]
    assert kl == pytest.approx([0.35, 0.35, -0.1, -0.1])  # the group's log-ratio S - T, shared equally


def test_boundaries_that_never_coincide_until_the_end():
    # student a|bc|de (ends 1,3,5), teacher ab|cd|e (2,4,5): the only common end is the last
    assert align.group([1, 3, 5], [2, 4, 5]) == [Group(0, 3, 0, 3)]
    out = align.spread([Group(0, 3, 0, 3)], [-0.5, -0.5, -2.0], [-1.0, -2.0, -3.0])
    assert out == pytest.approx([0.0, -1.0, -2.0])  # S = -6, T = -3: share +1 each; sum = T


def test_one_to_one_groups_are_the_same_vocabulary_estimator_exactly():
    groups = align.group([1, 2, 3], [1, 2, 3])
    assert groups == [Group(0, 1, 0, 1), Group(1, 2, 1, 2), Group(2, 3, 2, 3)]
    t_lp = [-0.123456789, -2.5, -1e-9]
    assert align.spread(groups, t_lp, [-7.0, -0.3, -0.1]) == t_lp  # bit for bit, not approximately


def test_a_token_adding_no_characters_joins_the_group_before_it():
    # student tokens x | "" | y (an empty piece at 1), teacher xy: one group; teacher x | y: the empty one
    # goes with x (cut after the last token ending at 1)
    assert align.group([1, 1, 2], [2]) == [Group(0, 3, 0, 1)]
    assert align.group([1, 1, 2], [1, 2]) == [Group(0, 2, 0, 1), Group(2, 3, 1, 2)]


def test_texts_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="different texts"):
        align.group([1, 2], [1, 3])


def test_stats_row_is_per_student_token():
    stats = align.AlignStats()
    stats.add([Group(0, 2, 0, 1), Group(2, 3, 1, 2)], [-1.0, -0.5], [-0.2, -0.3, -0.5])
    row = stats.row()
    # (S - T) = (-0.5 + 1.0) + (-0.5 + 0.5) = 0.5 over 3 student tokens; 2 of 3 in the 2:1 group
    assert row == pytest.approx({"align/kl": 0.5 / 3, "align/multi_token_frac": 2 / 3,
                                 "align/teacher_per_student": 2 / 3, "align/respelled": 0.0})


# -- token ends on real tokenizers ----------------------------------------------------------------------------
def test_byte_level_tokens_inside_a_character_offer_no_cut():
    student = byte_level()  # é is two byte tokens (c3, a9)
    teacher = byte_level(merges=[("Ã", "©")])  # é is one token
    s_ids, t_ids = ids(student, "é!"), ids(teacher, "é!")
    assert len(s_ids) == 3 and len(t_ids) == 2
    s_ends, t_ends = align.token_ends(student.decode, s_ids), align.token_ends(teacher.decode, t_ids)
    assert s_ends == [None, 1, 2] and t_ends == [1, 2]  # the first byte decodes to U+FFFD: no cut there
    assert align.group(s_ends, t_ends) == [Group(0, 2, 0, 1), Group(2, 3, 1, 2)]


def test_a_completion_cut_inside_a_character_still_ends_at_its_end():
    student = byte_level()
    s_ids = ids(student, "aé")[:2]  # max_tokens stopped after the first byte of é
    assert align.token_ends(student.decode, s_ids) == [1, 2]  # "a", then "a\ufffd" (the whole text)


# -- the orchestrator's side: prompts, completions, end of sequence ---------------------------------------
def test_pairs_teacher_scores_its_own_tokens_and_maps_back(chars, pairs):
    a = aligned(chars, pairs)
    prompt = ChatIds(chars("abcde=").input_ids, [{"role": "user", "content": "abcde="}])
    completion = ids(chars, "edcba") + [tiny_pair.EOS_ID]
    (t_prompt,), (t_completion,) = a.to_teacher([prompt], [completion])
    assert pairs.convert_ids_to_tokens(t_prompt) == ["<s>", "ab", "cd", "e", "="]  # the teacher's own rendering
    assert pairs.convert_ids_to_tokens(t_completion) == ["ed", "cb", "a", "</s>"]
    _, groups, _ = a.teacher_completion(completion)
    # the single-letter token a says "no letter follows" (else it would be a pair): the cut before </s> is not
    # kept, so a and </s> are one group on each side
    assert groups == [Group(0, 2, 0, 1), Group(2, 4, 1, 2), Group(4, 6, 2, 4)]
    s_lp = [-0.5] * 6
    (out,) = a.to_student([completion], [[-0.2, -1.0, -0.1, -0.05]], [s_lp])
    # shares (T - S)/k: ed (-0.2 + 1)/2 = 0.4; cb (-1 + 1)/2 = 0; a</s> (-0.15 + 1)/2 = 0.425
    assert out == pytest.approx([-0.1, -0.1, -0.5, -0.5, -0.075, -0.075])
    row = a.metrics()
    assert row == pytest.approx({"align/kl": (-0.8 + 0.0 - 0.85) / 6, "align/multi_token_frac": 1.0,
                                 "align/teacher_per_student": 4 / 6, "align/respelled": 0.0})
    assert a.metrics() == {}  # reset once read


def test_a_stop_after_a_single_letter_shares_the_letters_penalty(chars, pairs):
    # the pair teacher reads "edc</s>" as ed | c </s>: its c (not cb) already says the text stops, so the
    # student's c and </s> share that group's log-ratio (kept apart, the stop would look free and c would
    # carry the whole penalty); after a pair (ef | </s>) the cut stays
    a = aligned(chars, pairs)
    stop = [tiny_pair.EOS_ID]
    assert a.teacher_completion(ids(chars, "edc") + stop)[1] == [Group(0, 2, 0, 1), Group(2, 4, 1, 3)]
    assert a.teacher_completion(ids(chars, "ef") + stop)[1] == [Group(0, 2, 0, 1), Group(2, 3, 1, 2)]
    (out,) = a.to_student([ids(chars, "edc") + stop], [[-0.1, -17.0, -0.5]], [[-0.2, -0.2, -0.3, -0.7]])
    assert out == pytest.approx([-0.05, -0.05, -8.55, -8.95])  # shares (-0.1 + 0.4)/2, (-17.5 + 1.0)/2


def test_merge_joins_a_group_to_the_next_where_the_cut_is_not_kept():
    groups = [Group(0, 1, 0, 1), Group(1, 2, 1, 2), Group(2, 3, 2, 3)]
    assert align.merge(groups, [True, True]) == groups
    assert align.merge(groups, [False, True]) == [Group(0, 2, 0, 2), Group(2, 3, 2, 3)]
    assert align.merge(groups, [False, False]) == [Group(0, 3, 0, 3)]


def test_the_completion_is_tokenized_on_its_own_not_merged_into_the_prompt(chars, pairs):
    a = aligned(chars, pairs)
    prompt = ChatIds(chars("abc").input_ids, [{"role": "user", "content": "abc"}])
    (t_prompt,), (t_completion,) = a.to_teacher([prompt], [ids(chars, "d")])
    assert pairs.convert_ids_to_tokens(t_prompt + t_completion) == ["<s>", "ab", "c", "d"]  # as the student sampled
    assert pairs.convert_ids_to_tokens(pairs("abcd").input_ids) == ["<s>", "ab", "cd"]  # not the joint text's


def test_a_character_level_teacher_for_a_pair_student_splits_evenly_without_student_log_probs(chars, pairs):
    a = aligned(pairs, chars)  # the other direction: 1 student token : 2 teacher tokens
    completion = ids(pairs, "dcb")  # dc | b
    t_ids, groups, _ = a.teacher_completion(completion)
    assert chars.convert_ids_to_tokens(t_ids) == ["d", "c", "b"] and groups == [Group(0, 1, 0, 2), Group(1, 2, 2, 3)]
    assert a.to_student([completion], [[-0.25, -0.5, -1.0]]) == [pytest.approx([-0.75, -1.0])]
    assert a.metrics() == {}  # no sampler log-probs: nothing to estimate a KL from


def test_text_the_teacher_cannot_spell_is_a_group_of_its_own_and_counted(pairs):
    a = aligned(byte_level(), pairs)  # é (two byte tokens) is <unk> to the letter-pair teacher
    completion = ids(a.s_tok, "abé")
    t_ids, groups, differs = a.teacher_completion(completion)
    assert differs and pairs.convert_ids_to_tokens(t_ids) == ["ab", "<unk>"]
    # "abé" against "ab<unk>": ab lines up with ab; the rest (é: 2 byte tokens, <unk>: 1 token) is a group
    assert groups == [Group(0, 2, 0, 1), Group(2, 4, 1, 2)]
    (out,) = a.to_student([completion], [[-1.0, -5.0]], [[-0.1, -0.2, -0.3, -0.4]])
    assert out == pytest.approx([-0.45, -0.55, -2.45, -2.55])  # shares (-1 + 0.3)/2, (-5 + 0.7)/2
    assert a.metrics()["align/respelled"] == 1.0


def test_boundary_map_lines_up_the_text_around_a_stretch_spelled_otherwise():
    assert align.boundary_map("abc", "abc") == {0: 0, 1: 1, 2: 2, 3: 3}
    # "xéz" against "x<unk>z": x and z match; positions 1 (after x) and 6 (before z) are the stretch's edges
    assert align.boundary_map("xéz", "x<unk>z") == {0: 0, 1: 1, 6: 2, 7: 3}


def test_unscored_completions_stay_unscored(chars, pairs):
    assert aligned(chars, pairs).to_student([[5, 6]], [None], [[-1.0, -1.0]]) == [None]


def test_same_vocabulary_passes_everything_through():
    same = vocabulary.make(load([]), "", "")
    assert same.to_teacher([[1, 2]], [[3]]) == ([[1, 2]], [[3]])
    assert same.to_student([[3]], [[-0.5]], [[-0.1]]) == [[-0.5]] and same.metrics() == {}


# -- config and preflight -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--orchestrator.workflow", "sft", "--trainer.loss.kl_coef", "0"],
     r"^teacher\.vocabulary: \"align\" works with orchestrator\.workflow = \"distill\" only, got \"sft\""),
    (["--trainer.loss.corrective_coef", "0.1", "--trainer.loss.adv_tau", "1"],
     r"^trainer\.loss\.corrective_coef: must be 0 with teacher\.vocabulary = \"align\""),
])
def test_align_refuses_what_hands_teacher_tokens_to_the_student(argv, match):
    with pytest.raises(ConfigError, match=match):
        cfg(*argv)


def test_preflight_same_refuses_another_vocabulary_and_align_accepts_it(chars, pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher\.name: the teacher's tokenizer .* differs from the student's"):
        vocabulary.preflight(load([]), tmp_path / "s", tmp_path / "t", chars, pairs, ["abc="])
    vocabulary.preflight(cfg(), tmp_path / "s", tmp_path / "t", chars, pairs, ["abc="])


def test_preflight_align_refuses_a_tokenizer_that_does_not_decode_what_it_encodes(chars, pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.name: the tokenizer in .* does not decode what it encodes "
                                          r"\('ABC='"):
        vocabulary.preflight(cfg(), tmp_path / "s", tmp_path / "t", chars, pairs, ["ABC="])
