"""A YARA rule set shaped like a production one, generated at run time so the benchmarks and tests
need nothing outside the repository.

    .venv/bin/python bench/gen_rules.py DIR [--rules 400] [--seed 0]

The shapes follow public Linux rule sets (Elastic's ``Linux_*.yar``): most rules are one or two hex
strings of 16 to 24 bytes under ``all of them``; the rest mix hex strings with wildcards (``??``,
``4?``), jumps (``[2-6]``) and alternatives, text strings with ``nocase``/``wide ascii``/``fullword``,
regular expressions, and conditions on the ELF magic (``uint32(0) == 0x464c457f``,
``uint16(0) == 0x457f``), ``filesize`` bounds, ``any of``/``N of (...)`` and ``$a in (0..N)``. Names
are Elkeid-shaped (``Linux_Trojan_Xorddos_1a2b3c4d``: types, class, name). The strings are random, so
like a real set the rules rarely match ordinary files and every file costs a full scan. The same seed
gives the same files.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

CLASSES = ("Trojan", "Backdoor", "Cryptominer", "Exploit", "Rootkit", "Hacktool", "Ransomware",
           "Downloader", "Worm", "Webshell")
WORDS = ("/proc/self/exe", "LD_PRELOAD", "stratum+tcp://", "/etc/ld.so.preload", "/dev/tcp/", "HISTFILE",
         "authorized_keys", "getdents64", "kallsyms_lookup_name", "crontab -l", "iptables -F", "nohup ",
         "base64 -d", "chmod 777 ", "wget http", "curl -s ", "/tmp/.", "pkill -9 ", "hide_pid", "filepath",
         "masscan", "--donate-level", "SSH-2.0-", "PRIVMSG #", "User-Agent: ", "/bin/busybox ", "kworker",
         "rm -rf /var/log", "setsockopt", "/etc/rc.local", "POST /cgi-bin/", "unhide_file", "mining.subscribe")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.families: set[str] = set()

    def token(self, low: int = 4, high: int = 10) -> str:
        return "".join(self.rng.choice(ALPHABET) for _ in range(self.rng.randint(low, high)))

    def family(self) -> str:
        while True:
            name = self.token(4, 9).capitalize()
            if name[0].isalpha() and name not in self.families:
                self.families.add(name)
                return name

    def hex_bytes(self, count: int) -> list[str]:
        return [f"{self.rng.randrange(256):02X}" for _ in range(count)]

    def hex_string(self, length: int, fancy: bool) -> str:
        """Hex bytes; with ``fancy``, wildcards, nibble wildcards, a jump and an alternative after a
        fixed head of at least four bytes (a good atom, as real rules have)."""
        items = self.hex_bytes(self.rng.randint(4, 6))
        while len(items) < length:
            roll = self.rng.random() if fancy else 1.0
            if roll < 0.10:
                items.append("??")
            elif roll < 0.16:
                items.append(f"{self.rng.randrange(16):X}?")
            elif roll < 0.22:
                low = self.rng.randint(1, 4)
                items.append(f"[{low}-{low + self.rng.randint(1, 6)}]")
            elif roll < 0.27:
                items.append(f"( {' '.join(self.hex_bytes(2))} | {' '.join(self.hex_bytes(2))} )")
            else:
                items.append(self.hex_bytes(1)[0])
        return "{ " + " ".join(items + self.hex_bytes(2)) + " }"

    def text(self) -> str:
        word = self.rng.choice(WORDS) + self.token()
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def text_string(self) -> str:
        modifiers = self.rng.choice(("", "", " nocase", " wide ascii", " fullword", " ascii wide nocase"))
        return self.text() + modifiers

    def regex(self) -> str:
        head = self.token(5, 8)
        return self.rng.choice((
            f"/{head}[a-z0-9.\\-]{{4,32}}:[0-9]{{2,5}}/",
            f"/\\/dev\\/tcp\\/{head}[0-9]{{1,3}}\\.[0-9]{{1,3}}\\/[0-9]{{2,5}}/",
            f"/{head}_[A-Fa-f0-9]{{8,32}}/ nocase",
            f"/\\/tmp\\/\\.{head}[a-z]{{2,8}}\\/(bash|sh|python[23]?)/",
        ))

    def rule(self, name: str, threat: str) -> str:
        strings, condition = self.body()
        meta = (f'        author = "elkscan bench/gen_rules.py"\n'
                f'        id = "{self.rng.getrandbits(128):032x}"\n'
                f'        fingerprint = "{self.rng.getrandbits(256):064x}"\n'
                f'        creation_date = "2021-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"\n'
                f'        threat_name = "{threat}"\n'
                f"        severity = {self.rng.choice((50, 75, 100))}\n"
                f'        os = "linux"\n')
        lines = "".join(f"        ${sid} = {value}\n" for sid, value in strings)
        return (f"rule {name} {{\n    meta:\n{meta}    strings:\n{lines}    condition:\n"
                f"        {condition}\n}}\n")

    def body(self) -> tuple[list[tuple[str, str]], str]:
        roll = self.rng.random()
        if roll < 0.60:  # most of a real set: one or two plain hex strings
            strings = [(sid, self.hex_string(self.rng.randint(16, 24), False))
                       for sid in ("a", "b")[:self.rng.choice((1, 1, 1, 2))]]
            return strings, "all of them"
        if roll < 0.75:  # an ELF with several hex signatures, some fancy
            strings = [(f"a{i}", self.hex_string(self.rng.randint(12, 20), True))
                       for i in range(1, self.rng.randint(2, 4) + 1)]
            magic = self.rng.choice(("uint32(0) == 0x464c457f", "uint16(0) == 0x457f"))
            bound = self.rng.choice((2, 5, 10))
            return strings, f"{magic} and filesize < {bound}MB and {self.rng.choice(('any', '2'))} of ($a*)"
        if roll < 0.90:  # text strings with modifiers, a count of them
            strings = [(f"str{i}", self.text_string()) for i in range(1, self.rng.randint(3, 6) + 1)]
            count = self.rng.randint(2, len(strings))
            if self.rng.random() < 0.5:
                return strings, f"{count} of them"
            return strings, f"uint32(0) == 0x464c457f and {count} of ($str*)"
        if roll < 0.97:  # regular expressions next to text and hex
            strings = [("re1", self.regex()), ("s1", self.text_string()),
                       ("h1", self.hex_string(self.rng.randint(10, 16), True))]
            return strings, "any of ($re*) and ($s1 or $h1)"
        shebang = self.rng.choice(('"#!/bin/sh"', '"#!/bin/bash"', '"#!/usr/bin/env python"'))
        strings = [("sh", shebang), ("c1", self.text_string()), ("c2", self.text_string())]
        return strings, "$sh in (0..64) and filesize < 1MB and any of ($c*)"


def generate(directory: str | Path, rules: int = 400, seed: int = 0) -> list[Path]:
    """Write ``rules`` rules in files of one to eight rules each (``Linux_<Class>_<Family>.yar``)
    under ``directory``; returns the files."""
    gen = Generator(seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    left = rules
    while left > 0:
        klass, family = gen.rng.choice(CLASSES), gen.family()
        count = min(left, gen.rng.randint(1, 8))
        text = "\n".join(gen.rule(f"Linux_{klass}_{family}_{gen.rng.getrandbits(32):08x}",
                                  f"Linux.{klass}.{family}") for _ in range(count))
        path = out / f"Linux_{klass}_{family}.yar"
        path.write_text(text)
        written.append(path)
        left -= count
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("directory", help="where the .yar files go (created if missing)")
    parser.add_argument("--rules", type=int, default=400, help="how many rules (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    files = generate(args.directory, args.rules, args.seed)
    print(f"{args.rules} rules in {len(files)} files under {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
