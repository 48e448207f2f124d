"""What text a prompt asks to see drawn: the text check runs only when there is some."""

import pytest

from atelier.prompt_text import asked_text, joined


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ('a neon sign "OPEN LATE" on a brick wall', ("OPEN LATE",)),
        ("a poster “Summer Sale” in bold type", ("Summer Sale",)),
        ("a mug with ‘best dad’ printed on it", ("best dad",)),
        ("a book cover «Le Petit Prince»", ("Le Petit Prince",)),
        ("a label „Frische Brötchen“", ("Frische Brötchen",)),
        ("a sign reading 'no parking' by the road", ("no parking",)),
        ('two signs, "EXIT" and "ENTRANCE"', ("EXIT", "ENTRANCE")),
        ('a banner that says "Happy   Birthday"', ("Happy Birthday",)),  # whitespace collapsed
        ("a sign that says WELCOME TO PARIS in red letters", ("WELCOME TO PARIS",)),
        ("a chalkboard which reads open late at night", ("open late",)),
        ("a poster with the words Hello World on it", ("Hello World",)),
        ("a cake with the text happy birthday, on a table", ("happy birthday",)),
        ("a t-shirt saying I LOVE NY", ("I LOVE NY",)),
        ("a storefront, text: BAKERY", ("BAKERY",)),
        ("a logo spelling out ACME", ("ACME",)),
        ("a diner sign with 'Joe's Diner' written on it", ("Joe's Diner",)),
        ("a book titled THE LAST HARBOR on a shelf", ("THE LAST HARBOR",)),
        ("a jar labeled sugar on the counter", ("sugar",)),
        ("a poster with the slogan JUST DO IT", ("JUST DO IT",)),
        ("a 'vintage' look, a label 'FRESH'", ("vintage", "FRESH")),  # a quoted style counts too: documented
    ],
)
def test_asked_text_is_found(prompt, expected):
    assert asked_text(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat on a windowsill at dusk",
        "don't show the dog's tail, it's the cat's turn",  # apostrophes are not quotes
        "a watercolor of a lighthouse",
        "a man reading",  # a cue with nothing after it
        "",
    ],
)
def test_prompts_asking_for_no_text_give_nothing(prompt):
    assert asked_text(prompt) == ()


def test_quoted_text_wins_over_a_cue():
    # The cue introduces the quote: the words before it are not text to draw.
    assert asked_text('a sign that says "OPEN" in neon') == ("OPEN",)


def test_joined_is_one_line():
    assert joined(("EXIT", "ENTRANCE")) == "EXIT ENTRANCE"
