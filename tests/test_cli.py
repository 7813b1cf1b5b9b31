"""The `llmopt` command: demo, inspect, compile --dump-kernels, eval, and one-line errors."""
import ast

from llmopt.cli import main


def test_demo_compiles_and_generates_like_transformers(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "| Smooth |" in out and "parameter bytes" in out
    assert "same as transformers' greedy generate: True" in out


def test_inspect_summarizes_the_reference_model(shared, capsys):
    assert main(["inspect", str(shared / "models" / "ref-llama-12m")]) == 0
    out = capsys.readouterr().out
    assert "43 linears, 13 norms, 6 attentions, 1 embeddings, lm head: lm_head" in out
    assert "parameters: 12.59 M" in out and "linear 43" in out


def test_compile_dumps_generated_kernels(shared, tmp_path, capsys):
    kernels = tmp_path / "kernels"
    code = main(["compile", str(shared / "models" / "ref-llama-12m"), "--passes", "fuseattention",
                 "--out", str(tmp_path / "out"), "--dump-kernels", str(kernels)])
    assert code == 0
    files = sorted(kernels.glob("*.py"))
    assert len(files) >= 12  # one RMSNorm group per norm (13) and one SiLU·mul group per layer (6), at least
    for f in files:
        source = f.read_text()
        ast.parse(source)
        assert "@triton.jit" in source and "Nodes (fx node" in source


def test_eval_reports_perplexity(shared, capsys):
    assert main(["eval", str(shared / "models" / "ref-llama-12m"), "--data", str(shared / "data" / "wikitext-2" / "test.txt"),
                 "--max-windows", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmopt inspect: error:") and "is not a directory" in err and "\n" not in err
    assert main(["compile", str(tmp_path), "--passes", "rtn:bits=4", "--out", str(tmp_path / "o")]) == 1
    assert "config.json" in capsys.readouterr().err
    # the passes are checked before the model loads (a 7B model takes minutes): a typo is reported first
    assert main(["compile", str(tmp_path), "--passes", "awq:gqa_vo=yes", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "gqa_vo='yes' must be true or false" in err and "\n" not in err
    # so are the output paths: a file where a directory goes would fail only after the passes ran
    (tmp_path / "taken").write_text("")
    assert main(["compile", str(tmp_path), "--out", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"llmopt compile: error: --out {tmp_path / 'taken'} is a file; give a directory (it is created if missing)"


def test_eval_of_a_compiled_directory_refuses_passes(shared, tmp_path, capsys):
    out = tmp_path / "compiled"
    assert main(["compile", str(shared / "models" / "ref-llama-12m"), "--out", str(out)]) == 0
    data = str(shared / "data" / "wikitext-2" / "test.txt")
    assert main(["eval", str(out), "--data", data, "--max-windows", "2", "--passes", "rtn:bits=3"]) == 1
    assert "already compiled" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", data, "--max-windows", "2", "--device", "cpu"]) == 0
