"""Code extraction and output comparison: last known fence wins, think sections never count, whitespace rules."""

from sdzero_pl.tasks.code.reward import extract_code, outputs_match, strip_thinking


def test_last_block_with_a_known_language_wins():
    text = "```python\nprint(1)\n```\nbetter:\n```cpp\nint main(){}\n```\nsample output:\n```text\n1\n```"
    assert extract_code(text) == ("cpp", "int main(){}\n")


def test_untagged_block_is_python_and_aliases_map_to_two_languages():
    assert extract_code("```\nprint(2)\n```") == ("python", "print(2)\n")
    aliases = [("py", "python"), ("python3", "python"), ("Python", "python"), ("c++", "cpp"), ("CPP", "cpp")]
    for tag, language in aliases:
        assert extract_code(f"```{tag}\nx\n```") == (language, "x\n"), tag


def test_unknown_languages_and_unterminated_fences_give_no_code():
    assert extract_code("```bash\nrm -rf /\n```") is None
    assert extract_code("```java\nclass A {}\n```") is None
    assert extract_code("```python\nprint(1)\n") is None  # cut off mid-block: not a program
    assert extract_code("no code at all") is None


def test_code_inside_think_is_ignored():
    assert extract_code("<think>\n```python\nprint(1)\n```\n</think>\nI give up.") is None
    text = "<think>```python\nprint(1)\n```</think>\n```python\nprint(2)\n```"
    assert extract_code(text) == ("python", "print(2)\n")
    # the opening tag may sit in the prompt (thinking chat templates): only text after the last </think> counts
    assert extract_code("```python\nprint(1)\n```</think>done") is None
    # an unclosed think (truncated generation) hides everything after it
    assert extract_code("```python\nprint(3)\n```\n<think>```python\nprint(4)\n```") == ("python", "print(3)\n")
    assert strip_thinking("a<think>b</think>c<think>d</think>e") == "e"


def test_fence_info_string_and_indented_fences():
    assert extract_code("```python title=main.py\nprint(5)\n```") == ("python", "print(5)\n")
    assert extract_code("  ```cpp\n  int main(){}\n  ```") == ("cpp", "  int main(){}\n")


def test_outputs_match_ignores_trailing_whitespace_and_trailing_blank_lines_only():
    assert outputs_match(b"1 2 \n3\n\n\n", "1 2\n3")
    assert outputs_match(b"YES\r\n", "YES\n")
    assert outputs_match(b"", "")
    assert outputs_match(b"\n", "")
    assert not outputs_match(b" 1\n", "1\n")  # leading whitespace counts
    assert not outputs_match(b"1\n\n2\n", "1\n2\n")  # inner blank lines count
    assert not outputs_match(b"YES", "yes")
    assert outputs_match("Привет\n".encode(), "Привет")
