from neuranet.cli import app

app(prog_name="neuranet")
