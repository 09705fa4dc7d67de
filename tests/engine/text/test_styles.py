"""Prompt styles (A1111's styles.csv): expansion, saving, the PNG round trip, presets that name styles."""
import pytest
from PIL import Image

from engine import Engine, UserError
from engine.options import Preset, load_preset, save_preset
from engine.store.metadata import parse_parameters
from engine.store.outputs import read_parameters
from engine.text.styles import STYLES_FILE, Styles, merge, parse_csv, unmerge

CSV = ('name,prompt,negative_prompt\n'
       'Framed,"a photo of {prompt}, sharp focus","blurry, {prompt} out of focus"\n'
       'Appended,"vivid colours","lowres, watermark"\n')


@pytest.fixture
def styles(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return Styles(path)


def test_placeholder_takes_the_prompt_and_a_style_without_one_is_appended(styles):
    assert styles.expand("a red circle", "", ["Framed"]) == ("a photo of a red circle, sharp focus",
                                                             "blurry,  out of focus")
    assert styles.expand("a red circle", "noise", ["Appended"]) == ("a red circle, vivid colours",
                                                                    "noise, lowres, watermark")
    assert styles.expand("", "", ["Appended"]) == ("vivid colours", "lowres, watermark")  # no leading comma
    both = styles.expand("a cat", "ugly", ["Framed", "Appended"])  # in the order chosen
    assert both == ("a photo of a cat, sharp focus, vivid colours", "blurry, ugly out of focus, lowres, watermark")
    assert styles.extract(*both, ["Framed", "Appended"]) == ("a cat", "ugly")
    assert styles.extract("something else", "ugly", ["Framed"]) is None  # not made by that style
    assert unmerge("{prompt} and {prompt}", merge("{prompt} and {prompt}", "x")) == "x"
    with pytest.raises(UserError, match="Unknown style 'Nope'; styles are: Framed, Appended"):
        styles.expand("a", "", ["Nope"])


def test_styles_round_trip_through_png_info(tmp_path, styles):
    engine = Engine(runtime="pytorch", outputs_dir=tmp_path / "out", styles_file=styles.path)
    engine.load("builtin:tiny")
    request = {"prompt": "a red circle", "negative_prompt": "ugly", "styles": ["Framed", "Appended"], "width": 64,
               "height": 64, "steps": 1, "seed": 3}
    first = engine.txt2img(request)
    with Image.open(first.saved_paths[0]) as im:
        text = read_parameters(im)
    assert text.startswith("a photo of a red circle, sharp focus, vivid colours\n"
                           "Negative prompt: blurry, ugly out of focus, lowres, watermark\n")
    assert 'Styles array: "[\\"Framed\\", \\"Appended\\"]"' in text
    fields = parse_parameters(text)
    assert fields["styles"] == ["Framed", "Appended"]
    # PNG info sends the typed prompt and the styles back; the same request makes the same text again.
    prompt, negative = engine.styles.extract(fields["prompt"], fields["negative_prompt"], fields["styles"])
    assert (prompt, negative) == ("a red circle", "ugly")
    again = engine.txt2img({**request, "prompt": prompt, "negative_prompt": negative, "styles": fields["styles"]})
    assert again.infotexts == first.infotexts
    # What PNG info's "Send to txt2img" fills in; after the style changes, the full prompt without it.
    from ui.components import UI_DEFAULTS
    from ui.tabs.png_info import sent_fields

    values, note = sent_fields(engine, fields, UI_DEFAULTS)
    assert (values["prompt"], values["styles"], note) == ("a red circle", ["Framed", "Appended"], None)
    engine.styles.save("Framed", "a drawing of {prompt}", "")
    values, note = sent_fields(engine, fields, UI_DEFAULTS)
    assert values["prompt"] == fields["prompt"] and values["styles"] == [] and "Framed" in note


def test_save_as_style_writes_a1111_csv_and_replaces_by_name(styles):
    styles.save("Mine, with a comma", 'a "quoted" {prompt}', "noise")
    styles.save("Appended", "pastel", "")
    text = styles.path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "name,prompt,negative_prompt"
    back = parse_csv(text)
    assert list(back) == ["Framed", "Appended", "Mine, with a comma"]
    assert back["Mine, with a comma"].prompt == 'a "quoted" {prompt}' and back["Appended"].prompt == "pastel"
    assert Styles(styles.path).expand("x", "", ["Appended"]) == ("x, pastel", "")  # a fresh reader sees it
    for name, prompt in (("", "x"), ("two\nlines", "x"), ("empty", "")):
        with pytest.raises(UserError):
            styles.save(name, prompt, "")


def test_an_unreadable_styles_file_is_not_overwritten(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes(b"name,prompt\n\xff\xfe broken")
    styles = Styles(path)
    assert styles.names() == [] and "could not be read" in styles.error
    with pytest.raises(UserError, match="Not saved"):
        styles.save("new", "x", "")
    assert path.read_bytes() == b"name,prompt\n\xff\xfe broken"


def test_shipped_styles_and_a_preset_that_names_them(tmp_path):
    shipped = Styles(STYLES_FILE)
    assert "Default negative" in shipped.names() and shipped.get("Default negative").negative_prompt
    save_preset(Preset(name="styled", styles=("Default negative", "Photographic")), tmp_path)
    assert load_preset("styled", tmp_path).styles == ("Default negative", "Photographic")
