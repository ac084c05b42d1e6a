#!/usr/bin/env python3
"""A process function for pixflow: reads an image's format and size from its header.

pixflow starts this program with the port to serve on in $PORT (like OpenFaaS's of-watchdog)
and sends each invocation as an HTTP POST whose body is the caller's bytes and whose query
string carries the caller's parameters. Standard library only.
"""
import json
import os
import struct
from http.server import BaseHTTPRequestHandler, HTTPServer


def image_info(data: bytes) -> dict:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return {"format": "png", "width": width, "height": height}
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return {"format": "gif", "width": width, "height": height}
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            # Start-of-frame markers carry the size (not DHT, JPG, DAC).
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return {"format": "jpeg", "width": width, "height": height}
            i += 2 + length
    raise ValueError("not a PNG, GIF or JPEG image")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        data = self.rfile.read(length)
        try:
            body, status = image_info(data), 200
        except ValueError as e:
            body, status = {"error": str(e)}, 422
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
