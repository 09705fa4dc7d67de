"""Shared page pieces, built in-process: the embedding picker lists the engine's names and adds one to the box
chosen."""
import gradio as gr

from ui.components import embedding_picker, with_word


class Names:
    def __init__(self):
        self.names = ["myemb"]

    def embedding_names(self):
        return list(self.names)


def test_embedding_picker_adds_the_name_to_the_chosen_box_and_refreshes():
    engine = Names()
    with gr.Blocks() as page:
        prompt, negative = gr.Textbox(), gr.Textbox()
        embedding_picker(engine, prompt, negative)
    dropdown = next(b for b in page.blocks.values() if isinstance(b, gr.Dropdown))
    assert [c[0] for c in dropdown.choices] == ["myemb"]
    fns = {f.fn.__name__: f.fn for f in page.fns.values()}
    add, refresh = fns["added"], fns["<lambda>"]
    assert add("a cat", "", "myemb", "Prompt")[0] == "a cat myemb"
    assert add("a cat", "blurry", "myemb", "Negative prompt")[1] == "blurry myemb"
    engine.names.append("other")
    assert refresh()["choices"] == ["myemb", "other"]
    assert with_word("", "x") == "x" and with_word("a, ", "x") == "a, x"
