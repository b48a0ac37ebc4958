//! Guest assets for cela microVMs (in progress): the initramfs archive writer.

pub mod cpio;
