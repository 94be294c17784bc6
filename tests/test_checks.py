"""heal_pl.checks: the UTF-8 decoding and JSON reading behind the file errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from heal_pl.checks import decode_utf8, read_json_object


def test_decode_utf8_names_the_line_and_column_of_the_first_bad_byte() -> None:
    assert decode_utf8("Très bien, 谢谢\n".encode(), "f.txt") == "Très bien, 谢谢\n"
    data = b"ok\nfine\nab\xc3(d\n\xff"
    with pytest.raises(ValueError, match=r"^f.txt, line 3: not valid UTF-8 \(byte 0xc3 at column 3\); save the file"):
        decode_utf8(data, "f.txt")
    with pytest.raises(ValueError, match=r"^rows.jsonl, line 12: not valid UTF-8 \(byte 0xff at column 1\)"):
        decode_utf8(b"\xff{}", "rows.jsonl", first_line=12)  # one line of a file, numbered by the caller


def test_read_json_object_names_the_field_for_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "persona.json"
    path.write_bytes('{\n  "pos_system": "Sé amable."\n}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"persona_file='.*persona.json', line 2: not valid UTF-8 \(byte 0xe9 at "
                                         r"column 19\)"):  # fmt: skip
        read_json_object(path, "persona_file")
    path.write_text('{"pos_system": "Sé amable."}', encoding="utf-8")
    assert read_json_object(path, "persona_file") == {"pos_system": "Sé amable."}
