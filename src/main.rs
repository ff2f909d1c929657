use std::process::ExitCode;

fn main() -> ExitCode {
    s3blk::cli::main()
}
