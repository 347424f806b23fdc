"""Parsing the multipart form of an upload, as the service would; a bad one is an InvalidUpload (400)."""

from __future__ import annotations

from dataclasses import dataclass
from email import policy as email_policy
from email.message import Message
from email.parser import BytesHeaderParser


class InvalidUpload(Exception):
    """A request the stand-in answers with 400 and this reason."""


# --- multipart parsing ---------------------------------------------------------------


@dataclass
class Form:
    fields: dict[str, str]
    undecodable: list[str]  # text fields that were not UTF-8
    image_bytes: bytes | None
    image_filename: str | None
    image_content_type: str | None


def _header_params(value: str) -> Message:
    message = Message()
    message["content-type"] = value
    return message


def parse_multipart(body: bytes, content_type: str) -> Form:
    """Split a multipart/form-data body; raise InvalidUpload when it is not one."""
    header = _header_params(content_type or "")
    if header.get_content_type() != "multipart/form-data":
        raise InvalidUpload("content-type: must be multipart/form-data")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise InvalidUpload("content-type: multipart/form-data needs a boundary")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    form = Form({}, [], None, None, None)
    position = body.find(delimiter)
    if position < 0:
        raise InvalidUpload("body: malformed multipart/form-data (no boundary found)")
    head_parser = BytesHeaderParser(policy=email_policy.HTTP)
    while True:
        position += len(delimiter)
        if body[position : position + 2] == b"--":
            return form
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise InvalidUpload("body: malformed multipart/form-data (truncated)")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise InvalidUpload("body: malformed multipart/form-data (missing closing boundary)")
        head_end = body.find(b"\r\n\r\n", start, end + 2)
        if head_end < 0:
            raise InvalidUpload("body: malformed multipart/form-data (part without headers)")
        part_head = head_parser.parsebytes(body[start : head_end + 4])
        content = body[head_end + 4 : end]
        _add_part(form, part_head, content)
        position = end + 2


def _add_part(form: Form, head: Message, content: bytes) -> None:
    name = head.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        return
    filename = head.get_filename()
    if name == "image":
        if form.image_bytes is None:
            form.image_bytes = content
            form.image_filename = filename
            form.image_content_type = head.get("content-type")
        return
    if filename is not None or name in form.fields:
        return  # other file parts are ignored; for repeated fields the first one counts
    try:
        form.fields[name] = content.decode("utf-8")
    except UnicodeDecodeError:
        form.fields[name] = content.decode("utf-8", "replace")
        form.undecodable.append(name)
