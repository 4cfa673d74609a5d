"""BLEU and ROUGE-L tokenized by script (issue 21 item 3): non-Latin answers are scored on their
words/characters, English scores are exactly the libraries' defaults."""
import pytest

from skilllens.concepts.metrics import bleu_scores, rouge_l_scores, text_scores
from skilllens.concepts.tokenize import UnicodeTokenizer, detect_script

# (reference, near-identical answer (one word added), unrelated answer in the same language)
PAIRS = {
    "en": ("The capital of France is Paris, a large and beautiful city.",
           "The capital of France is Paris, a very large and beautiful city.",
           "My brother repairs old bicycles every weekend in his garage."),
    "ru": ("Столица Франции — Париж, большой и красивый город.",
           "Столица Франции — Париж, очень большой и красивый город.",
           "Мой брат по выходным чинит старые велосипеды в гараже."),
    "zh": ("法国的首都是巴黎，这是一个美丽的大城市。",
           "法国的首都是巴黎，这是一个非常美丽的大城市。",
           "我哥哥每个周末在车库里修理旧自行车。"),
    "hi": ("फ्रांस की राजधानी पेरिस है, जो एक बड़ा और सुंदर शहर है।",
           "फ्रांस की राजधानी पेरिस है, जो एक बहुत बड़ा और सुंदर शहर है।",
           "मेरा भाई हर सप्ताहांत अपने गैराज में पुरानी साइकिलें ठीक करता है।"),
    "ar": ("عاصمة فرنسا هي باريس، وهي مدينة كبيرة وجميلة.",
           "عاصمة فرنسا هي باريس، وهي مدينة كبيرة جدا وجميلة.",
           "يصلح أخي الدراجات القديمة في مرآبه كل عطلة نهاية أسبوع."),
    "de": ("Die Hauptstadt Frankreichs ist Paris, eine große und schöne Stadt.",
           "Die Hauptstadt Frankreichs ist Paris, eine sehr große und schöne Stadt.",
           "Mein Bruder repariert jedes Wochenende alte Fahrräder in seiner Garage."),
    "vi": ("Thủ đô của Pháp là Paris, một thành phố lớn và đẹp.",
           "Thủ đô của Pháp là Paris, một thành phố rất lớn và đẹp.",
           "Anh trai tôi sửa xe đạp cũ trong ga ra mỗi cuối tuần."),
    "ja": ("フランスの首都はパリで、大きくて美しい都市です。",
           "フランスの首都はパリで、とても大きくて美しい都市です。",
           "兄は毎週末ガレージで古い自転車を修理しています。"),
}
SCRIPT = {"en": "latin", "de": "latin", "vi": "latin", "ru": "spaced", "hi": "spaced",
          "ar": "spaced", "zh": "han", "ja": "unspaced"}


@pytest.mark.parametrize("lang", sorted(PAIRS))
def test_near_identical_high_unrelated_low(lang):
    ref, near, other = PAIRS[lang]
    s = text_scores([near, other], [ref, ref])
    b, r = bleu_scores([near, other], [ref, ref]), rouge_l_scores([near, other], [ref, ref])
    assert s.script == SCRIPT[lang]
    assert b[0] >= 0.5 and r[0] >= 0.8, (lang, b, r)  # one word added
    assert b[1] <= 0.15 and r[1] <= 0.25, (lang, b, r)  # nothing in common but the language
    assert s.bleu == pytest.approx(sum(b) / 2) and s.rougeL == pytest.approx(sum(r) / 2)


def test_english_scores_are_the_library_defaults():
    import sacrebleu
    from rouge_score import rouge_scorer

    ref, near, other = PAIRS["en"]
    s = text_scores([near, other], [ref, ref])
    assert (s.script, s.bleu_tokenize, s.rouge_tokenize) == ("latin", "13a", "words")
    default = rouge_scorer.RougeScorer(["rougeL"])
    for p, b, r in zip([near, other], bleu_scores([near, other], [ref, ref]),
                       rouge_l_scores([near, other], [ref, ref])):
        assert b == pytest.approx(sacrebleu.sentence_bleu(p, [ref]).score / 100, abs=1e-12)
        assert r == pytest.approx(default.score(ref, p)["rougeL"].fmeasure, abs=1e-12)


def test_tokenizer_and_recorded_tokenization():
    words, chars = UnicodeTokenizer("words"), UnicodeTokenizer("chars")
    assert words.tokenize("Größe_und Straße, x2!") == ["größe", "und", "straße", "x2"]
    assert words.tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in the word
    assert chars.tokenize("巴黎 Paris 2024年") == ["巴", "黎", "paris", "2024", "年"]
    assert chars.tokenize("ภาษาไทย") == ["ภ", "า", "ษ", "า", "ไ", "ท", "ย"]
    assert detect_script(["", "  "]) == "latin"
    d = text_scores([PAIRS["zh"][1]], [PAIRS["zh"][0]]).to_dict()
    assert (d["script"], d["bleu_tokenize"], d["rouge_tokenize"]) == ("han", "zh", "chars")


@pytest.mark.parametrize("ref,pred", [
    ("bà ba bán bánh bò", "bả bá bàn bành bỏ"),  # vi: every word differs (tones); old ROUGE-L 1.0
    ("Er wäre schön müde", "Er ware schon mude"),  # de: three different words; old ROUGE-L 1.0
])
def test_accented_latin_words_are_not_cut_at_diacritics(ref, pred):
    assert rouge_l_scores([pred], [ref])[0] <= 0.3
