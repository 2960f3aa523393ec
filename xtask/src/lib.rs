//! What the lab tests share with xtask's tasks: the image recipe, so that
//! tests/tests/oci_image.rs runs the very image `cargo xtask image` makes.

pub mod image;
