//! `troupe model info`: the model's description as a table.

pub(crate) fn print_info(info: &troupe::ModelInfo) {
    let c = &info.config;
    println!(
        "file              {} ({:.1} MiB)",
        info.path.display(),
        info.file_bytes as f64 / (1 << 20) as f64
    );
    println!("name              {}", info.name.as_deref().unwrap_or("-"));
    println!("architecture      {}", info.architecture);
    println!(
        "parameters        {} ({:.1} M)",
        info.parameters,
        info.parameters as f64 / 1e6
    );
    let types: Vec<String> = info
        .tensor_types
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    println!("tensor types      {}", types.join(", "));
    println!("context length    {}", c.context_length);
    println!("vocab size        {}", c.vocab_size);
    println!(
        "shape             {} layers, width {}, mlp {}, {} heads / {} kv heads of {}",
        c.n_layers, c.hidden, c.intermediate, c.n_head, c.n_kv_head, c.head_dim
    );
    let tok = |t: &(u32, String)| format!("{} {:?}", t.0, t.1);
    println!(
        "bos               {}",
        info.bos.as_ref().map(tok).unwrap_or_else(|| "-".into())
    );
    println!(
        "eos               {}",
        info.eos.iter().map(tok).collect::<Vec<_>>().join(", ")
    );
    println!("pre-tokenizer     {}", info.pretokenizer);
    println!(
        "chat template     {}",
        if info.chat_template_embedded {
            "embedded"
        } else {
            "none (ChatML fallback)"
        }
    );
    println!("weights           {}", info.weights_chosen);
    let kv: Vec<String> = info
        .kv_bytes_per_token
        .iter()
        .map(|(d, b)| format!("{d} {b} bytes"))
        .collect();
    println!(
        "kv per token      {} (default {})",
        kv.join(", "),
        troupe::KvDtype::default()
    );
}

/// `troupe model list`: each catalogue model, whether it is present, and where.
pub(crate) fn print_catalogue() {
    for e in troupe::model::catalogue::CATALOGUE {
        println!(
            "{:<20} {:>4} MiB  {:<8} {}\n{:<20} {}",
            e.name,
            e.size >> 20,
            if e.is_present() { "present" } else { "absent" },
            e.description,
            "",
            e.path().display()
        );
    }
}
