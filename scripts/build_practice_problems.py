#!/usr/bin/env python
"""Build the practice problem sets: small Python functions with tests, written for this project, in the problem format
`mftcoder eval --benchmark FILE` reads (docs/eval.md).

They are easy to moderately easy on purpose: a model as small as SmolLM2-135M-Instruct, sampling at a temperature
around 0.8, should pass some of them some of the time, so that `mftcoder eval --n N --pairs FILE` finds problems with
both passing and failing answers. Every fourth problem is held out:

    mftcoder/assets/problems/practice.jsonl          45 problems, to sample and train on
    mftcoder/assets/problems/practice_heldout.jsonl  15 problems, to measure on

Each problem here carries its reference solution (written to the file as `canonical_solution`, which eval runs before
scoring) and a wrong solution, a plausible mistake the tests must catch (kept here only; tests/test_eval_pairs.py runs
both through the sandbox). The output depends only on this file: running it twice gives byte-identical files.

Usage::

    python scripts/build_practice_problems.py [--out mftcoder/assets/problems]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "mftcoder" / "assets" / "problems"
ASK = "Reply with the complete function in one ```python code block."


@dataclass(frozen=True)
class Practice:
    """One problem: the function asked for, what it does, its test cases (arguments, expected result), the first of
    which is the example in the prompt, a reference solution and a wrong one."""

    signature: str  # e.g. "double_each(nums)"
    does: str  # completes "Write a Python function `signature` that ..."
    cases: tuple[tuple[tuple, object], ...]
    reference: str
    wrong: str

    @property
    def name(self) -> str:
        return self.signature.split("(", 1)[0]

    def call(self, args: tuple) -> str:
        return f"{self.name}({', '.join(map(repr, args))})"

    def prompt(self) -> str:
        args, expected = self.cases[0]
        return (f"Write a Python function `{self.signature}` that {self.does}\n\n"
                f"For example, `{self.call(args)}` returns `{expected!r}`.\n\n{ASK}")

    def test(self) -> str:
        lines = [f"    assert candidate({', '.join(map(repr, args))}) == {expected!r}" for args, expected in self.cases]
        return "def check(candidate):\n" + "\n".join(lines) + "\n"

    def record(self) -> dict:
        return {"task_id": self.name, "prompt": self.prompt(), "entry_point": self.name, "test": self.test(),
                "canonical_solution": self.reference}


def p(signature: str, does: str, cases: list, reference: str, wrong: str) -> Practice:
    return Practice(signature, does, tuple((tuple(args), expected) for args, expected in cases), reference, wrong)


PROBLEMS = [
    p("double_each(nums)", "returns a new list with every number of `nums` multiplied by 2.",
      [(([1, 2, 3],), [2, 4, 6]), (([],), []), (([-5, 0, 7],), [-10, 0, 14])],
      "def double_each(nums):\n    return [2 * x for x in nums]\n",
      "def double_each(nums):\n    return [x + x for x in nums[1:]]\n"),
    p("last_char(s)", "returns the last character of the non-empty string `s`.",
      [(("hello",), "o"), (("a",), "a"), (("xyz!",), "!")],
      "def last_char(s):\n    return s[-1]\n",
      "def last_char(s):\n    return s[len(s) - 2]\n"),
    p("count_spaces(s)", "returns how many space characters (' ') the string `s` contains.",
      [(("a b c",), 2), (("",), 0), (("  two  ",), 4), (("none",), 0)],
      "def count_spaces(s):\n    return s.count(' ')\n",
      "def count_spaces(s):\n    return len(s.split()) - 1\n"),
    p("average_of(nums)", "returns the arithmetic mean of the non-empty list of numbers `nums` as a float.",
      [(([1, 2, 3, 4],), 2.5), (([2],), 2.0), (([-1, 1],), 0.0), (([10, 20, 60],), 30.0)],
      "def average_of(nums):\n    return sum(nums) / len(nums)\n",
      "def average_of(nums):\n    return sum(nums) // len(nums)\n"),
    p("is_multiple_of_three(n)", "returns True if the integer `n` is divisible by 3, otherwise False.",
      [((9,), True), ((10,), False), ((0,), True), ((-6,), True), ((1,), False)],
      "def is_multiple_of_three(n):\n    return n % 3 == 0\n",
      "def is_multiple_of_three(n):\n    return n % 3 == 0 and n > 0\n"),
    p("join_with_dash(words)", "joins the strings of the list `words` into one string, with a dash '-' between "
      "neighbours.",
      [((["a", "b", "c"],), "a-b-c"), ((["solo"],), "solo"), (([],), ""), ((["x", "", "y"],), "x--y")],
      "def join_with_dash(words):\n    return '-'.join(words)\n",
      "def join_with_dash(words):\n    return ''.join(w + '-' for w in words)\n"),
    p("square_all(nums)", "returns a new list with the square of every number of `nums`.",
      [(([1, 2, 3],), [1, 4, 9]), (([-2],), [4]), (([],), []), (([0, 10],), [0, 100])],
      "def square_all(nums):\n    return [x * x for x in nums]\n",
      "def square_all(nums):\n    return [x * 2 for x in nums]\n"),
    p("count_char(s, ch)", "returns how many times the single character `ch` occurs in the string `s`.",
      [(("banana", "a"), 3), (("banana", "z"), 0), (("", "a"), 0), (("Aa", "a"), 1)],
      "def count_char(s, ch):\n    return s.count(ch)\n",
      "def count_char(s, ch):\n    return s.lower().count(ch.lower())\n"),
    p("capitalize_words(s)", "returns the string `s` (words separated by single spaces) with every word's first letter "
      "in upper case and the rest of the word in lower case.",
      [(("hello WORLD",), "Hello World"), (("a",), "A"), (("mIxEd cAsE here",), "Mixed Case Here"), (("",), "")],
      "def capitalize_words(s):\n    return ' '.join(w.capitalize() for w in s.split(' '))\n",
      "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n"),
    p("min_max_pair(nums)", "returns a tuple (smallest, largest) of the non-empty list of numbers `nums`.",
      [(([3, 1, 2],), (1, 3)), (([5],), (5, 5)), (([-1, -7, 4, 0],), (-7, 4))],
      "def min_max_pair(nums):\n    return (min(nums), max(nums))\n",
      "def min_max_pair(nums):\n    return (nums[0], nums[-1])\n"),
    p("remove_digits(s)", "returns the string `s` with every digit character removed.",
      [(("a1b2c3",), "abc"), (("2024",), ""), (("no digits",), "no digits"), (("",), "")],
      "def remove_digits(s):\n    return ''.join(c for c in s if not c.isdigit())\n",
      "def remove_digits(s):\n    return ''.join(c for c in s if c.isalpha())\n"),
    p("sum_of_evens(nums)", "returns the sum of the even integers in the list `nums` (0 when there are none).",
      [(([1, 2, 3, 4],), 6), (([1, 3],), 0), (([],), 0), (([-2, 5, 8],), 6)],
      "def sum_of_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)\n",
      "def sum_of_evens(nums):\n    return sum(nums[::2])\n"),
    p("repeat_with_commas(s, n)", "returns the string `s` repeated `n` times with a comma between the copies "
      "(an empty string when `n` is 0).",
      [(("ab", 3), "ab,ab,ab"), (("x", 1), "x"), (("x", 0), ""), (("", 2), ",")],
      "def repeat_with_commas(s, n):\n    return ','.join([s] * n)\n",
      "def repeat_with_commas(s, n):\n    return (s + ',') * n\n"),
    p("first_negative(nums)", "returns the first negative number in the list `nums`, or None if there is none.",
      [(([3, -1, -5],), -1), (([1, 2],), None), (([],), None), (([-9],), -9)],
      "def first_negative(nums):\n    for x in nums:\n        if x < 0:\n            return x\n    return None\n",
      "def first_negative(nums):\n    negatives = [x for x in nums if x < 0]\n    return min(negatives) if negatives "
      "else None\n"),
    p("count_words(s)", "returns the number of words in the string `s`, where words are separated by any amount of "
      "whitespace.",
      [(("one two three",), 3), (("",), 0), (("  spaced   out  ",), 2), (("tab\tand\nnewline",), 3)],
      "def count_words(s):\n    return len(s.split())\n",
      "def count_words(s):\n    return len(s.split(' '))\n"),
    p("celsius_to_fahrenheit(c)", "converts the temperature `c` in degrees Celsius to degrees Fahrenheit "
      "(multiply by 9/5, then add 32).",
      [((100,), 212.0), ((0,), 32.0), ((-40,), -40.0), ((25,), 77.0)],
      "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n",
      "def celsius_to_fahrenheit(c):\n    return (c + 32) * 9 / 5\n"),
    p("clamp(x, low, high)", "returns `x` limited to the range from `low` to `high`: `low` if `x` is below it, `high` "
      "if `x` is above it, else `x`.",
      [((5, 0, 10), 5), ((-3, 0, 10), 0), ((12, 0, 10), 10), ((10, 0, 10), 10)],
      "def clamp(x, low, high):\n    return max(low, min(x, high))\n",
      "def clamp(x, low, high):\n    return min(low, max(x, high))\n"),
    p("middle_element(items)", "returns the element of the non-empty list `items` at index len(items) // 2.",
      [(([1, 2, 3],), 2), ((["a", "b", "c", "d"],), "c"), (([7],), 7)],
      "def middle_element(items):\n    return items[len(items) // 2]\n",
      "def middle_element(items):\n    return items[(len(items) - 1) // 2]\n"),
    p("ends_with_vowel(word)", "returns True if the non-empty string `word` ends with a vowel (a, e, i, o or u, in "
      "either case), otherwise False.",
      [(("banana",), True), (("sky",), False), (("ECHO",), True), (("tree",), True), (("cat",), False)],
      "def ends_with_vowel(word):\n    return word[-1].lower() in 'aeiou'\n",
      "def ends_with_vowel(word):\n    return word[-1] in 'aeiou'\n"),
    p("run_length(s)", "returns the run-length encoding of the string `s`: each run of equal characters becomes the "
      "character followed by the run's length.",
      [(("aaabcc",), "a3b1c2"), (("",), ""), (("z",), "z1"), (("aabaa",), "a2b1a2")],
      "def run_length(s):\n    out = []\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and "
      "s[j] == s[i]:\n            j += 1\n        out.append(s[i] + str(j - i))\n        i = j\n"
      "    return ''.join(out)\n",
      "def run_length(s):\n    return ''.join(c + str(s.count(c)) for c in dict.fromkeys(s))\n"),
    p("second_largest(nums)", "returns the second largest distinct value in the list `nums`, or None if it has fewer "
      "than two distinct values.",
      [(([4, 1, 3],), 3), (([5, 5, 2],), 2), (([7, 7],), None), (([],), None), (([-1, -2, -3],), -2)],
      "def second_largest(nums):\n    values = sorted(set(nums))\n"
      "    return values[-2] if len(values) >= 2 else None\n",
      "def second_largest(nums):\n    values = sorted(nums)\n    return values[-2] if len(values) >= 2 else None\n"),
    p("digit_product(n)", "returns the product of the decimal digits of the positive integer `n`.",
      [((234,), 24), ((7,), 7), ((105,), 0), ((1111,), 1)],
      "def digit_product(n):\n    result = 1\n    for d in str(n):\n        result *= int(d)\n    return result\n",
      "def digit_product(n):\n    return sum(int(d) for d in str(n))\n"),
    p("rotate_left(items, k)", "returns the list `items` rotated `k` places to the left (the first `k` elements "
      "move to the end); `k` may be larger than the length, and an empty list stays empty.",
      [(([1, 2, 3, 4, 5], 2), [3, 4, 5, 1, 2]), (([1, 2, 3], 0), [1, 2, 3]), (([1, 2, 3], 4), [2, 3, 1]),
       (([], 3), [])],
      "def rotate_left(items, k):\n    if not items:\n        return []\n    k %= len(items)\n    return items[k:] + "
      "items[:k]\n",
      "def rotate_left(items, k):\n    return items[k:] + items[:k]\n"),
    p("chunk(items, size)", "splits the list `items` into consecutive lists of length `size` (the last may be "
      "shorter) and returns the list of them.",
      [(([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]]), (([], 3), []), (([1, 2], 5), [[1, 2]]),
       (([1, 2, 3], 1), [[1], [2], [3]])],
      "def chunk(items, size):\n    return [items[i:i + size] for i in range(0, len(items), size)]\n",
      "def chunk(items, size):\n    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]\n"),
    p("dedupe_keep_order(items)", "returns the elements of the list `items` without repeats, each kept where it "
      "first appears.",
      [(([3, 1, 3, 2, 1],), [3, 1, 2]), (([],), []), ((["b", "a", "b"],), ["b", "a"]), (([5, 5, 5],), [5])],
      "def dedupe_keep_order(items):\n    seen = []\n    for x in items:\n        if x not in seen:\n            "
      "seen.append(x)\n    return seen\n",
      "def dedupe_keep_order(items):\n    return sorted(set(items))\n"),
    p("vowel_positions(s)", "returns the list of indexes in the string `s` that hold a lower-case vowel "
      "(a, e, i, o, u).",
      [(("hello",), [1, 4]), (("xyz",), []), (("aei",), [0, 1, 2]), (("bAnana",), [3, 5])],
      "def vowel_positions(s):\n    return [i for i, c in enumerate(s) if c in 'aeiou']\n",
      "def vowel_positions(s):\n    return [i for i, c in enumerate(s) if c.lower() in 'aeiou']\n"),
    p("word_lengths(s)", "returns a list with the length of each space-separated word of the string `s`, in order.",
      [(("the quick fox",), [3, 5, 3]), (("",), []), (("a bb ccc",), [1, 2, 3])],
      "def word_lengths(s):\n    return [len(w) for w in s.split()]\n",
      "def word_lengths(s):\n    return [len(w) for w in s.split(' ')]\n"),
    p("interleave(a, b)", "returns a list that alternates the elements of the lists `a` and `b` (a[0], b[0], a[1], "
      "b[1], ...); what is left of the longer list follows at the end.",
      [(([1, 2, 3], ["x", "y"]), [1, "x", 2, "y", 3]), (([], [1]), [1]), (([1, 2], [3, 4]), [1, 3, 2, 4])],
      "def interleave(a, b):\n    out = []\n    for i in range(max(len(a), len(b))):\n        if i < len(a):\n"
      "            out.append(a[i])\n        if i < len(b):\n            out.append(b[i])\n    return out\n",
      "def interleave(a, b):\n    out = []\n    for x, y in zip(a, b):\n        out += [x, y]\n    return out\n"),
    p("is_non_decreasing(nums)", "returns True if every number of the list `nums` is at least as large as the one "
      "before it (an empty list counts), otherwise False.",
      [(([1, 2, 2, 5],), True), (([3, 1],), False), (([],), True), (([4],), True), (([1, 3, 2, 4],), False)],
      "def is_non_decreasing(nums):\n    return all(a <= b for a, b in zip(nums, nums[1:]))\n",
      "def is_non_decreasing(nums):\n    return all(a < b for a, b in zip(nums, nums[1:]))\n"),
    p("count_greater(nums, x)", "returns how many numbers in the list `nums` are strictly greater than `x`.",
      [(([1, 5, 7, 3], 4), 2), (([], 0), 0), (([2, 2, 2], 2), 0), (([-1, 0, 1], -5), 3)],
      "def count_greater(nums, x):\n    return sum(1 for n in nums if n > x)\n",
      "def count_greater(nums, x):\n    return sum(1 for n in nums if n >= x)\n"),
    p("pairs_summing_to(nums, target)", "returns how many pairs of positions i < j in the list `nums` have "
      "nums[i] + nums[j] == target.",
      [(([1, 2, 3, 4], 5), 2), (([1, 1, 1], 2), 3), (([], 0), 0), (([5], 10), 0)],
      "def pairs_summing_to(nums, target):\n    count = 0\n    for i in range(len(nums)):\n"
      "        for j in range(i + 1, "
      "len(nums)):\n            if nums[i] + nums[j] == target:\n                count += 1\n    return count\n",
      "def pairs_summing_to(nums, target):\n    return sum(1 for a in nums for b in nums if a + b == target)\n"),
    p("to_binary_padded(n, width)", "returns the binary digits of the non-negative integer `n` as a string, padded "
      "on the left with zeros to at least `width` characters.",
      [((5, 8), "00000101"), ((0, 1), "0"), ((10, 2), "1010"), ((1, 3), "001")],
      "def to_binary_padded(n, width):\n    return bin(n)[2:].zfill(width)\n",
      "def to_binary_padded(n, width):\n    return bin(n)[2:].zfill(width)[-width:]\n"),
    p("parse_int_list(s)", "reads a string of integers separated by commas, with optional spaces around them, and "
      "returns them as a list of ints (an empty list for an empty string).",
      [(("1, 2,3",), [1, 2, 3]), (("",), []), ((" -4 , 10",), [-4, 10]), (("7",), [7])],
      "def parse_int_list(s):\n    return [int(part) for part in s.split(',')] if s.strip() else []\n",
      "def parse_int_list(s):\n    return [int(part) for part in s.split(',')]\n"),
    p("most_common_char(s)", "returns the character that occurs most often in the non-empty string `s`; when "
      "several are tied, the one that appears first.",
      [(("abracadabra",), "a"), (("xyzzy",), "y"), (("b",), "b"), (("aabb",), "a"), (("bbaa",), "b")],
      "def most_common_char(s):\n    return max(s, key=s.count)\n",
      "def most_common_char(s):\n    return max(sorted(set(s)), key=s.count)\n"),
    p("initials(name)", "returns the initials of the space-separated words of the string `name`, each upper case and "
      "followed by a dot.",
      [(("Ada Lovelace",), "A.L."), (("grace brewster hopper",), "G.B.H."), (("x",), "X.")],
      "def initials(name):\n    return ''.join(w[0].upper() + '.' for w in name.split())\n",
      "def initials(name):\n    return '.'.join(w[0].upper() for w in name.split())\n"),
    p("running_total(nums)", "returns the list of running totals of `nums`: element i is the sum of nums[0] through "
      "nums[i].",
      [(([1, 2, 3],), [1, 3, 6]), (([],), []), (([5, -5, 5],), [5, 0, 5])],
      "def running_total(nums):\n    out, total = [], 0\n    for x in nums:\n        total += x\n        "
      "out.append(total)\n    return out\n",
      "def running_total(nums):\n    return [sum(nums[:i]) for i in range(len(nums))]\n"),
    p("flatten_once(lists)", "takes a list of lists and returns one list with all their elements, in order.",
      [(([[1, 2], [3], []],), [1, 2, 3]), (([],), []), (([["a"], ["b", "c"]],), ["a", "b", "c"])],
      "def flatten_once(lists):\n    return [x for inner in lists for x in inner]\n",
      "def flatten_once(lists):\n    return [inner[0] for inner in lists if inner]\n"),
    p("mask_all_but_last4(s)", "returns the string `s` with every character except the last four replaced by '*'; a "
      "string of four characters or fewer is returned unchanged.",
      [(("1234567890",), "******7890"), (("abcd",), "abcd"), (("ab",), "ab"), (("hello",), "*ello")],
      "def mask_all_but_last4(s):\n    return '*' * max(len(s) - 4, 0) + s[-4:]\n",
      "def mask_all_but_last4(s):\n    return '*' * (len(s) - 4) + s[4:]\n"),
    p("count_all_caps_words(s)", "returns how many space-separated words of the string `s` consist only of upper-case "
      "letters.",
      [(("NASA and the ESA",), 2), (("",), 0), (("Hello World",), 0), (("OK OK ok",), 2)],
      "def count_all_caps_words(s):\n    return sum(1 for w in s.split() if w.isalpha() and w.isupper())\n",
      "def count_all_caps_words(s):\n    return sum(1 for w in s.split() if w[0].isupper())\n"),
    p("merge_counts(a, b)", "takes two dictionaries of numbers and returns a new dictionary with every key of either; "
      "a key in both gets the sum of its two values.",
      [(({"x": 1, "y": 2}, {"y": 3, "z": 4}), {"x": 1, "y": 5, "z": 4}), (({}, {}), {}), (({"k": 1}, {}), {"k": 1})],
      "def merge_counts(a, b):\n    out = dict(a)\n    for key, value in b.items():\n"
      "        out[key] = out.get(key, 0) "
      "+ value\n    return out\n",
      "def merge_counts(a, b):\n    return {**a, **b}\n"),
    p("invert_dict(d)", "returns a new dictionary that maps each value of the dictionary `d` to its key (the values "
      "are all different).",
      [(({"a": 1, "b": 2},), {1: "a", 2: "b"}), (({},), {}), (({"x": "y"},), {"y": "x"})],
      "def invert_dict(d):\n    return {value: key for key, value in d.items()}\n",
      "def invert_dict(d):\n    return {key: value for value, key in enumerate(d)}\n"),
    p("gcd_of_list(nums)", "returns the greatest common divisor of the non-empty list of positive integers `nums`.",
      [(([12, 18, 24],), 6), (([7],), 7), (([9, 28],), 1), (([100, 75, 50],), 25)],
      "import math\n\n\ndef gcd_of_list(nums):\n    result = nums[0]\n    for x in nums[1:]:\n        result = "
      "math.gcd(result, x)\n    return result\n",
      "def gcd_of_list(nums):\n    return min(nums)\n"),
    p("to_snake_case(name)", "converts the camelCase identifier `name` to snake_case: an underscore before each "
      "upper-case letter, and all letters lower case.",
      [(("helloWorldFoo",), "hello_world_foo"), (("plain",), "plain"), (("aB",), "a_b"), (("getHTTP",), "get_h_t_t_p")],
      "def to_snake_case(name):\n    return ''.join('_' + c.lower() if c.isupper() else c for c in name)\n",
      "def to_snake_case(name):\n    return name.lower()\n"),
    p("to_camel_case(name)", "converts the snake_case identifier `name` to camelCase: the first word as it is, each "
      "following word with its first letter in upper case, and no underscores.",
      [(("hello_world",), "helloWorld"), (("one",), "one"), (("a_b_c",), "aBC"), (("make_it_work",), "makeItWork")],
      "def to_camel_case(name):\n    first, *rest = name.split('_')\n    return first + ''.join(w[:1].upper() + w[1:] "
      "for w in rest)\n",
      "def to_camel_case(name):\n    return ''.join(w[:1].upper() + w[1:] for w in name.split('_'))\n"),
    p("percent_string(part, whole)", "returns `part` as a percentage of `whole`, rounded to the nearest whole number, "
      "as a string ending in '%'.",
      [((1, 4), "25%"), ((1, 3), "33%"), ((2, 3), "67%"), ((5, 5), "100%"), ((0, 9), "0%")],
      "def percent_string(part, whole):\n    return f'{round(100 * part / whole)}%'\n",
      "def percent_string(part, whole):\n    return f'{int(100 * part / whole)}%'\n"),
    p("split_evens_odds(nums)", "returns a tuple of two lists: the even numbers of `nums`, then the odd ones, each in "
      "their original order.",
      [(([1, 2, 3, 4],), ([2, 4], [1, 3])), (([],), ([], [])), (([7, 9],), ([], [7, 9])), (([0, -3],), ([0], [-3]))],
      "def split_evens_odds(nums):\n    return ([x for x in nums if x % 2 == 0], [x for x in nums if x % 2])\n",
      "def split_evens_odds(nums):\n    return ([x for x in nums if x % 2], [x for x in nums if x % 2 == 0])\n"),
    p("max_step(nums)", "returns the largest absolute difference between two neighbouring numbers in the list `nums` "
      "(0 when it has fewer than two numbers).",
      [(([1, 4, 2, 9],), 7), (([5],), 0), (([],), 0), (([10, 3, 5],), 7)],
      "def max_step(nums):\n    return max((abs(b - a) for a, b in zip(nums, nums[1:])), default=0)\n",
      "def max_step(nums):\n    return max(nums) - min(nums) if nums else 0\n"),
    p("count_in_range(nums, low, high)", "returns how many numbers of the list `nums` lie between `low` and `high`, "
      "both included.",
      [(([1, 5, 10, 15], 5, 10), 2), (([], 0, 1), 0), (([3, 3, 3], 3, 3), 3), (([-2, 0, 2], -1, 1), 1)],
      "def count_in_range(nums, low, high):\n    return sum(1 for x in nums if low <= x <= high)\n",
      "def count_in_range(nums, low, high):\n    return sum(1 for x in nums if low < x < high)\n"),
    p("index_of_max(nums)", "returns the index of the largest number in the non-empty list `nums`; when it occurs "
      "more than once, the first such index.",
      [(([3, 9, 2, 9],), 1), (([5],), 0), (([-4, -1, -7],), 1)],
      "def index_of_max(nums):\n    return nums.index(max(nums))\n",
      "def index_of_max(nums):\n    return len(nums) - 1 - nums[::-1].index(max(nums))\n"),
    p("strip_punctuation(s)", "returns the string `s` without any of the ASCII punctuation characters of "
      "`string.punctuation`.",
      [(("Hello, world!",), "Hello world"), (("a.b-c_d",), "abcd"), (("",), ""), (("no marks",), "no marks")],
      "import string\n\n\ndef strip_punctuation(s):\n    return ''.join(c for c in s if c not in string.punctuation)\n",
      "def strip_punctuation(s):\n    return s.replace(',', '').replace('.', '').replace('!', '')\n"),
    p("longest_run(nums)", "returns the length of the longest run of equal neighbouring values in the list `nums` "
      "(0 for an empty list).",
      [(([1, 1, 2, 2, 2, 1],), 3), (([],), 0), (([4],), 1), (([1, 2, 3],), 1), (([7, 7, 7, 7],), 4),
       (([1, 2, 1, 2, 1],), 1)],
      "def longest_run(nums):\n    best = run = 0\n    for i, x in enumerate(nums):\n        run = run + 1 if i and x "
      "== nums[i - 1] else 1\n        best = max(best, run)\n    return best\n",
      "def longest_run(nums):\n    return max((nums.count(x) for x in nums), default=0)\n"),
    p("to_minutes(hhmm)", "converts a time of day written as 'HH:MM' into the number of minutes after midnight.",
      [(("02:30",), 150), (("00:00",), 0), (("23:59",), 1439), (("10:05",), 605)],
      "def to_minutes(hhmm):\n    hours, minutes = hhmm.split(':')\n    return int(hours) * 60 + int(minutes)\n",
      "def to_minutes(hhmm):\n    hours, minutes = hhmm.split(':')\n    return int(hours) * 100 + int(minutes)\n"),
    p("format_seconds(total)", "formats the non-negative number of seconds `total` as minutes and seconds, 'M:SS' "
      "(the seconds always two digits).",
      [((65,), "1:05"), ((0,), "0:00"), ((3600,), "60:00"), ((59,), "0:59")],
      "def format_seconds(total):\n    return f'{total // 60}:{total % 60:02d}'\n",
      "def format_seconds(total):\n    return f'{total // 60}:{total % 60}'\n"),
    p("same_digits(a, b)", "returns True if the non-negative integers `a` and `b` are written with exactly the same "
      "digits, each used as many times (in any order), otherwise False.",
      [((123, 321), True), ((112, 122), False), ((0, 0), True), ((10, 1), False), ((4554, 5445), True)],
      "def same_digits(a, b):\n    return sorted(str(a)) == sorted(str(b))\n",
      "def same_digits(a, b):\n    return set(str(a)) == set(str(b))\n"),
    p("alternate_case(s)", "returns the string `s` with the characters at even indexes in upper case and those at odd "
      "indexes in lower case.",
      [(("abcd",), "AbCd"), (("",), ""), (("HELLO",), "HeLlO"), (("a b",), "A B")],
      "def alternate_case(s):\n    return ''.join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s))\n",
      "def alternate_case(s):\n    return ''.join(c.lower() if i % 2 == 0 else c.upper() for i, c in enumerate(s))\n"),
    p("sum_of_squares_below(n)", "returns the sum of k * k for every integer k with 0 <= k < n (0 when n is 0).",
      [((4,), 14), ((0,), 0), ((1,), 0), ((10,), 285)],
      "def sum_of_squares_below(n):\n    return sum(k * k for k in range(n))\n",
      "def sum_of_squares_below(n):\n    return sum(k * k for k in range(n + 1))\n"),
    p("char_histogram(s)", "returns a dictionary that maps each character of the string `s`, except spaces, to the "
      "number of times it occurs.",
      [(("a b a",), {"a": 2, "b": 1}), (("",), {}), (("zz z",), {"z": 3})],
      "def char_histogram(s):\n    counts = {}\n    for c in s:\n        if c != ' ':\n            counts[c] = "
      "counts.get(c, 0) + 1\n    return counts\n",
      "def char_histogram(s):\n    return {c: s.count(c) for c in s}\n"),
    p("safe_divide(a, b)", "returns `a` divided by `b` as a float, or None when `b` is 0.",
      [((7, 2), 3.5), ((1, 0), None), ((0, 5), 0.0), ((-9, 3), -3.0)],
      "def safe_divide(a, b):\n    return None if b == 0 else a / b\n",
      "def safe_divide(a, b):\n    return None if b == 0 else a // b\n"),
    p("common_prefix(a, b)", "returns the longest string that both strings `a` and `b` start with.",
      [(("flower", "flow"), "flow"), (("dog", "cat"), ""), (("", "abc"), ""), (("same", "same"), "same"),
       (("abcx", "abdx"), "ab")],
      "def common_prefix(a, b):\n    i = 0\n    while i < min(len(a), len(b)) and a[i] == b[i]:\n        i += 1\n    "
      "return a[:i]\n",
      "def common_prefix(a, b):\n    return ''.join(x for x, y in zip(a, b) if x == y)\n"),
    p("count_nonblank_lines(text)", "returns how many lines of the string `text` hold something other than "
      "whitespace.",
      [(("a\n\nb\n",), 2), (("",), 0), (("  \n\t\nx",), 1), (("one",), 1)],
      "def count_nonblank_lines(text):\n    return sum(1 for line in text.splitlines() if line.strip())\n",
      "def count_nonblank_lines(text):\n    return len(text.splitlines())\n"),
]


def split(problems: list[Practice]) -> tuple[list[Practice], list[Practice]]:
    """(practice, held out): every fourth problem is held out."""
    return ([x for i, x in enumerate(problems) if i % 4 != 3], [x for i, x in enumerate(problems) if i % 4 == 3])


def write_jsonl(path: Path, problems: list[Practice]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(x.record(), ensure_ascii=False) + "\n" for x in problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the folder to write the two files to")
    out = parser.parse_args().out
    practice, heldout = split(PROBLEMS)
    write_jsonl(out / "practice.jsonl", practice)
    write_jsonl(out / "practice_heldout.jsonl", heldout)
    print(f"{len(practice)} problems to {out / 'practice.jsonl'}, {len(heldout)} to {out / 'practice_heldout.jsonl'}")


if __name__ == "__main__":
    main()
