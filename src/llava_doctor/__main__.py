from llava_doctor.cli import console

if __name__ == "__main__":
    console()
