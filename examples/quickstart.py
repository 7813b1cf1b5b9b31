"""Quickstart: compile a small Llama with a LoRA adapter, read the report, generate.

Entry point: `main()`. Run it (CPU, a few seconds; needs `peft`):

    python examples/quickstart.py

`llmopt.compile` captures the model with torch.export, runs the passes (MergeLoRA folds the adapter
into the base weights; Smooth migrates activation outliers into the weights, using calibration
data), and returns a `CompiledModel` that is called like the model and generates.
"""
import peft
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmopt
from llmopt.passes import MergeLoRA, Smooth


def small_llama_with_lora() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # a "trained" adapter: peft initialises B to zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model.eval()


def main():
    model = small_llama_with_lora()
    calibration = torch.randint(0, 256, (8, 32))  # [N, T] token ids; use real text for a real model
    cm = llmopt.compile(model, passes=[MergeLoRA(), Smooth(0.5)], calibration=calibration, backend="torch")
    print(cm.report())

    prompt = torch.tensor([[1, 17, 42, 99, 7]])  # [B, T]
    with torch.no_grad():
        expected = model(input_ids=prompt).logits
    print(f"max |logits - eager logits|: {(cm(prompt) - expected).abs().max().item():.2e}")
    print("generated:", cm.generate(prompt, max_new_tokens=10)[0].tolist())


if __name__ == "__main__":
    main()
