"""Print the README's check-code table: `python -m llava_doctor.checks.readme_table`."""

from llava_doctor.checks.base import codes_table_markdown

if __name__ == "__main__":
    print(codes_table_markdown(), end="")
