"""diffq's Gradio demo: full precision and quantized images side by side.

The full demo (model and preset pickers, side-by-side images, bytes, seconds, PSNR/SSIM, plan
and calibration tabs) is tracked in its own issue. Until it lands, this page quantizes a model
with a preset and shows one image next to the full-precision one.
"""

from __future__ import annotations

import argparse


def build_app():
    import gradio as gr
    import torch

    import diffq

    def generate(model: str, preset: str, prompt: str, seed: float):
        if not prompt.strip():
            raise gr.Error("The prompt is empty: say what to draw, e.g. 'a handwritten digit 7'.")
        try:
            images = []
            for quantize in (False, True):
                pipe = diffq.load(model)
                if quantize:
                    diffq.quantize(pipe, preset, progress=False)
                generator = torch.Generator().manual_seed(int(seed))
                images.append(pipe(prompt, generator=generator).images[0])
            return images
        except diffq.DiffQError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="diffq") as demo:
        gr.Markdown("# diffq — full precision vs quantized")
        with gr.Row():
            model = gr.Textbox("digits-sd", label="model")
            preset = gr.Dropdown(diffq.available_presets(), value="w4a8", label="preset")
            seed = gr.Number(0, label="seed")
        prompt = gr.Textbox("a handwritten digit 7", label="prompt")
        button = gr.Button("generate")
        with gr.Row():
            fp_image, q_image = gr.Image(label="full precision"), gr.Image(label="quantized")
        button.click(generate, [model, preset, prompt, seed], [fp_image, q_image])
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="diffq demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    build_app().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
