"""How close read text is to asked text (``text_accuracy``): pure functions, no OCR model needed."""

from atelier.imaging.ocr import normalized, similarity, similarity_any_order


def test_similarity_ignores_case_spacing_and_punctuation_but_not_letters() -> None:
    assert similarity("Open late!", "OPENLATE") == 1.0
    assert similarity("Café", "CAFÉ") == 1.0
    assert 0.8 < similarity("OPEN LATE", "OPEN LATF") < 1.0
    assert similarity("OPEN LATE", "0P3N L4T3") < similarity("OPEN LATE", "OPEN LATF")
    assert similarity("OPEN LATE", "OPEN LATE TODAY ONLY") < 1.0  # text drawn besides what was asked counts
    assert similarity("", "") == 1.0 and similarity("abc", "") == 0.0


def test_normalized_keeps_letters_and_digits_of_any_script() -> None:
    assert normalized("Open  late! 24/7") == "openlate247"
    assert normalized("東京 タワー") == "東京タワー"


def test_pieces_score_in_the_order_they_were_drawn() -> None:
    assert similarity("EXIT ENTRANCE", "ENTRANCE EXIT") < 0.7
    assert similarity_any_order(("EXIT", "ENTRANCE"), "ENTRANCE EXIT") == 1.0
    assert similarity_any_order(("OPEN LATE",), "OPEN LATE") == 1.0
    five = ("A1", "B2", "C3", "D4", "E5")  # beyond four pieces: the order asked only
    assert similarity_any_order(five, "E5 D4 C3 B2 A1") < 1.0 == similarity_any_order(five, "A1 B2 C3 D4 E5")


def test_the_cli_summary_says_what_the_text_check_read() -> None:
    from atelier.cli.generate import text_check_note

    assert text_check_note({"seed": 7}) == ""
    metrics = {"text_read": ["OPEN LATE", "OPEN LATF"], "text_accuracy": 0.9444, "text_candidates": 3}
    assert text_check_note(metrics) == "; text read 'OPEN LATE', 'OPEN LATF' (accuracy 0.94, best of 3)"
