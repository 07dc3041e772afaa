"""MaxText's vocabulary: every key of its ``base.yml``, sorted by what tpusim does with it.

A MaxText config is ``base.yml`` overridden by a model file (``configs/models/<model_name>.yml``)
overridden by the user's keys; copies of both are in ``workloads/maxtext/`` (provenance in its
README). Each key is one of:

- **modelled**: it shapes a step's performance and tpusim uses it (the vocabulary of
  :mod:`tpusim.model.workload`);
- **ignored**: it does not change one step's time or memory (logging, checkpointing, data paths,
  learning rate, ...): accepted, and listed once when the user's own file sets it;
- **noted**: it changes performance a little (kernel tile sizes, numerics, fusions) and tpusim does
  not model it: accepted, with a note naming it when it differs from base.yml's default;
- **refused**: it changes performance a lot and tpusim does not model it yet (partial
  pipelining, multimodal encoders, ...): a value other than base.yml's default is refused
  with "not modelled yet", since ignoring it would give a wrong answer.

Only a key in none of these (nor in a model file) is an "unknown key" with a suggestion. The
groups carry a one-line reason each; ``tests/test_maxtext.py`` checks that every base.yml key is in
exactly one class.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tpusim.config import read_yaml
from tpusim.data import data_dir

# group -> (why, keys). Ignored: no effect on one training step's time or HBM.
IGNORED: dict[str, tuple[str, str]] = {
    "run": ("names and bookkeeping of the run", """
        run_name override_model_config override_logical_axis_rules hardware log_config debug_sharding
        enable_single_controller check_vma sharding_tolerance steps log_period max_checkify
        enable_nnx pure_nnx_decoder pure_nnx model_call_mode internal_compile internal_compile_num_devices
        compiled_trainstep_file compile_topology compile_topology_num_slices write_estimator_result
        jax_distributed_initialization_timeout jax_debug_log_modules skip_jax_distributed_system jax_cache_dir
        subslice_shape base_output_directory abort_on_nan_loss abort_on_inf_loss skip_step_on_spikes
        skip_step_interval skip_step_scaling_factor log_moe_bias_norms"""),
    "checkpointing": ("saving and restoring state happens between steps", """
        load_parameters_path lora_input_adapters_path hf_lora_adapter_path load_full_state_path
        enable_checkpointing save_checkpoint_on_start save_checkpoint_on_completion async_checkpointing
        checkpoint_period max_num_checkpoints_to_keep enable_continuous_checkpointing
        enable_single_replica_ckpt_restoring checkpoint_todelete_subdir checkpoint_todelete_full_path force_unroll
        checkpoint_storage_target_data_file_size_bytes checkpoint_storage_use_ocdbt checkpoint_storage_use_zarr3
        checkpoint_storage_concurrent_gb enable_orbax_v1 checkpoint_conversion_fn source_checkpoint_layout
        colocated_python_checkpointing enable_autocheckpoint enable_multi_tier_checkpointing
        multi_tier_checkpointing_backup_interval_minutes multi_tier_checkpointing_backup_interval_steps
        mtc_data_parallelism enable_emergency_checkpoint local_checkpoint_directory local_checkpoint_period
        checkpoint_is_quantized save_quantized_params_path enable_checkpoint_cloud_logger"""),
    "metrics and monitoring": ("reported after the step", """
        metrics_file gcs_metrics enable_wandb wandb_project_name wandb_run_name save_config_to_gcs
        record_internal_nn_metrics enable_goodput_recording monitor_goodput goodput_upload_interval_seconds
        enable_pathways_goodput monitor_step_time_deviation step_deviation_interval_seconds
        enable_gcp_goodput_metrics enable_gcp_step_deviation_metrics report_heartbeat_metric_for_gcp_monitoring
        heartbeat_reporting_interval_in_seconds report_performance_metric_for_gcp_monitoring enable_tensorboard
        use_vertex_tensorboard vertex_tensorboard_project vertex_tensorboard_region prometheus_port
        managed_mldiagnostics managed_mldiagnostics_on_demand_profiling managed_mldiagnostics_run_group
        managed_mldiagnostics_region managed_mldiagnostics_storage_path"""),
    "profiling and dumps": ("observe the run without changing the step", """
        profiler upload_all_profiler_results skip_first_n_steps_for_profiler profiler_steps
        hide_profiler_step_metric profile_cleanly profile_periodically_period enable_tpu_profiling_options
        tpu_num_chips_to_profile_per_task tpu_num_sparse_core_tiles_to_trace tpu_num_sparse_cores_to_trace
        dump_hlo dump_step dump_hlo_local_dir dump_hlo_delete_local_after dump_hlo_gcs_dir
        dump_hlo_local_module_name dump_hlo_module_name dump_hlo_xla_flags dump_hlo_upload_all dump_jaxpr
        dump_jaxpr_local_dir dump_jaxpr_delete_local_after dump_jaxpr_gcs_dir enable_jax_profiler
        jax_profiler_port xprof_tpu_power_trace_level xprof_e2e_enable_fw_throttle_event
        xprof_e2e_enable_fw_power_level_event xprof_e2e_enable_fw_thermal_event profile_power_events"""),
    "data pipeline": ("the host input pipeline runs ahead of the device step (tokens per step come from the batch)", """
        tokenizer_path tokenizer_type use_chat_template chat_template_path chat_template tokenize_train_data
        tokenize_eval_data add_bos add_eos use_truncation expansion_factor_real_data max_corpus_chars
        train_data_columns train_image_column eval_data_columns eval_image_column default_prompt packing
        num_epoch generate_padding_batch_train generate_padding_batch_eval max_segments_per_seq
        sft_train_on_completion_only dataset_type dataset_path dataset_name eval_dataset_name train_split
        eval_split hf_path hf_name hf_data_dir hf_train_files hf_eval_split hf_eval_files hf_access_token
        grain_train_files grain_eval_files grain_train_mixture_config_path grain_file_type grain_packing_type
        grain_worker_count grain_per_worker_buffer_size grain_num_threads grain_prefetch_buffer_size
        grain_worker_count_eval grain_per_worker_buffer_size_eval grain_ram_budget_mb grain_num_threads_eval
        grain_prefetch_buffer_size_eval grain_data_source_max_workers grain_index_storage_option
        grain_shuffle_buffer_size grain_use_elastic_iterator colocated_python_data_input olmo_index_path
        olmo_path_remap_from olmo_path_remap_to olmo_apply_ngram_filter enable_data_shuffling data_shuffle_seed
        reuse_example_batch input_data_sharding_logical_axes"""),
    "optimizer hyperparameters": ("values, not shapes: the same FLOPs and bytes whatever they are", """
        learning_rate lr_schedule_type learning_rate_final_fraction wsd_decay_steps_fraction wsd_decay_style
        warmup_steps_fraction learning_rate_schedule_steps gradient_clipping_threshold adam_b1 adam_b2 adam_eps
        adam_eps_root adam_weight_decay adamw_mask muon_beta muon_weight_decay muon_consistent_rms
        trainable_parameters_mask load_balance_loss_weight z_loss_multiplier routed_bias_update_rate
        mtp_loss_scaling_factor mtp_eval_target_module init_weights_seed dense_init_scale enable_dropout dropout_rate
        normalization_layer_epsilon indexer_loss_scaling_factor"""),
    "evaluation": ("runs between training steps", """
        eval_per_device_batch_size eval_start_step eval_interval eval_steps target_eval_loss
        custom_mesh_and_rule_for_eval logical_axis_rules_for_eval"""),
    "position encoding": ("RoPE variants change a few elementwise ops per token, not the matmuls", """
        rope_type rope_linear_scaling_factor rope_use_scale rope_min_timescale rope_max_timescale
        local_rope_max_timescale global_rope_max_timescale global_rope_proportion local_rope_proportion
        max_position_embeddings original_max_position_embeddings rope_factor beta_fast beta_slow mscale
        rope_interleave rope_truncate rope_attention_scaling rope_pairwise compressed_rope_max_timescale
        partial_rotary_factor use_mrope mrope_section position_id_per_seconds nope_layer_interval
        temperature_tuning"""),
    "inference and decoding": ("serving keys (tpusim serve reads its own); a training step has no decode", """
        max_prefill_predict_length prompt load_from_prefill_dir prefill_cache_dir autoregressive_decode_assert
        decode_sampling_strategy decode_sampling_nucleus_p decode_sampling_top_k decode_sampling_temperature
        inference_microbenchmark_prefill_lengths inference_microbenchmark_stages
        inference_microbenchmark_loop_iters inference_microbenchmark_log_file_path
        inference_microbenchmark_num_samples inference_metadata_file inference_server prefill_slice
        generate_slice inference_benchmark_test enable_model_warmup enable_llm_inference_pool multi_sampling
        return_log_prob stack_prefill_result_cache prefill_cache_axis_order ar_cache_axis_order
        compute_axis_order reshape_q use_ragged_attention ragged_block_size prefill_chunk_size
        use_chunked_prefill enable_prefix_caching prefix_caching_hbm_byte prefix_caching_dram_byte
        enable_padding_causal_mask quantize_kvcache kv_quant_axis kv_quant_dtype mla_naive_kvcache
        vllm_hf_config_path vllm_hf_overrides vllm_additional_config"""),
    "inference configs": ("a key MaxText's inference/ configs set beyond base.yml (JetStream's experimental "
                          "sharding rules); tpusim serve reads the mesh from the ici_* keys", """
        sharding_strategy"""),
    "multimodal encoders": ("used only with use_multimodal / use_audio, which are refused", """
        freeze_vision_encoder_params freeze_audio_encoder_params dtype_mm remat_policy_for_vit
        image_size_for_vit image_path video_path audio_path image_placeholder video_placeholder
        audio_placeholder use_audio_in_video video_max_grid_t video_max_grid_h video_max_grid_w
        posemb_type_for_vit max_num_images_per_example vision_output_length hidden_size_for_vit
        intermediate_size_for_vit num_attention_heads_for_vit num_channels_for_vit tile_size_for_vit
        patch_size_for_vit conv_stride_for_vit num_hidden_layers_for_vit projector_input_dim_for_vit
        projector_output_dim_for_vit rope_theta_for_vit vision_output_dim_for_vit pixel_shuffle_ratio_for_vit
        projector_dropout_for_vit spatial_merge_size_for_vit out_hidden_size_for_vit temporal_patch_size_for_vit
        num_position_embeddings_for_vit deepstack_visual_indexes_for_vit d_model_for_audio
        encoder_attention_heads_for_audio encoder_ffn_dim_for_audio encoder_layers_for_audio
        attention_dropout_for_audio activation_dropout_for_audio activation_function_for_audio
        num_mel_bins_for_audio max_source_positions_for_audio scale_embedding_for_audio n_window_for_audio
        n_window_infer_for_audio conv_chunksize_for_audio downsample_hidden_size_for_audio output_dim_for_audio
        num_conv_layers_for_audio max_timescale_for_audio max_sample_len_for_audio vision_encoder_block"""),
    "distillation": ("used only by the distillation trainer, not train.py's step", """
        distill_alpha distill_temperature distill_beta distill_feature_loss_type distill_layer_indices
        distill_alpha_end distill_alpha_schedule distill_temperature_end distill_temperature_schedule
        distill_beta_end distill_beta_schedule"""),
    "elasticity and DiLoCo timing": ("restart and outer-loop policy, between steps", """
        elastic_enabled elastic_backup_kind elastic_timeout_seconds elastic_max_retries elastic_min_slice_count
        diloco_sync_period diloco_outer_lr diloco_outer_momentum dcn_bandwidth_limit dcn_bandwidth_burst
        dcn_bandwidth_latency dcn_bandwidth_interface"""),
    "quantization details": ("AQT's scale calibration and configuration files: the same int8 / fp8 matmuls", """
        constant_bound_config replicate_quant_scale quant_cfg_path use_qwix_quantization use_manual_quantization
        weight_quantization_calibration_method act_quantization_calibration_method
        bwd_quantization_calibration_method"""),
    "pipeline loop structure": ("how the pipeline's loops are scanned and where remat applies: the same work "
                                "compiled differently", """
        pipeline_fsdp_ag_per_repeat scan_pipeline_iterations scan_pipeline_repeats scan_layers_per_stage
        set_remat_policy_on_pipeline_iterations set_remat_policy_on_layers_per_stage"""),
    "rampup and sparsity schedule": ("used only with the features they configure, which are refused", """
        per_device_batch_size_start per_device_batch_size_increment global_rampup_samples
        weight_sparsity_update_step weight_sparsity_start_step weight_sparsity_m
        block_diffusion_mask_id block_diffusion_min_noise block_diffusion_logit_alignment
        block_diffusion_canvas_policy indexer_head_dim indexer_n_heads indexer_topk indexer_use_approx_top_k
        indexer_approx_top_k_recall indexer_mask_exact_topk indexer_sparse_training indexer_cutoff_threshold
        moba_chunk_size moba_topk engram_max_ngram_size engram_num_heads engram_head_dim engram_vocab_bases
        engram_kernel_size engram_seed engram sinkhorn_iterations enable_mhc_lite use_mhc_pallas_kernel
        mhc_pallas_kernel_fwd_block_size mhc_pallas_kernel_bwd_block_size gdn_conv_kernel_dim
        gdn_key_head_dim gdn_value_head_dim gdn_num_key_heads gdn_num_value_heads gdn_chunk_size
        use_qk_norm_in_gdn num_diloco_fragments enable_streaming_diloco use_sequential_layers
        num_communication_overlapping_steps communication_overlapping_alpha batch_split_factor"""),
    "custom remat policy": ("per-tensor save/offload choices of remat_policy: custom for tensors tpusim's layer "
                            "does not have by that name (fused or MLA projections): treated as recomputed", """
        kv_proj qkv_proj query_wa_proj kv_wa_proj mla_q mla_kv attention_out"""),
}

# Accepted; a value other than base.yml's names the key in a note (a small effect tpusim does not model).
NOTED: dict[str, tuple[str, str]] = {
    "kernel tiling": ("tile sizes and schedules of the Pallas kernels: the kernel's efficiency, not its FLOPs", """
        sa_block_kv_compute sa_block_kv_dkv_compute sa_bwd_dkv_megacore sa_q_layout sa_k_layout
        sa_v_layout use_splash_scheduler ring_scan_unroll sa_fuse_reciprocal sa_use_base2_exp local_sa_block_q
        local_sa_block_kv local_sa_block_kv_compute local_sa_block_q_dkv local_sa_block_kv_dkv
        local_sa_block_kv_dkv_compute local_sa_block_q_dq local_sa_block_kv_dq local_sa_use_fused_bwd_kernel
        local_sa_q_layout local_sa_k_layout local_sa_v_layout local_use_splash_scheduler local_sa_fuse_reciprocal
        local_sa_use_base2_exp use_max_logit_estimate cost_estimate_flops_fwd cost_estimate_flops_bwd
        dq_reduction_steps use_tokamax_splash use_jax_splash force_q_layout wi_tile_fwd_batch_seq
        wi_tile_fwd_embed_dim wi_tile_fwd_mlp_dim wi_tile_dlhs_batch_seq wi_tile_dlhs_embed_dim
        wi_tile_dlhs_mlp_dim wi_tile_drhs_batch_seq wi_tile_drhs_embed_dim wi_tile_drhs_mlp_dim
        wo_tile_fwd_batch_seq wo_tile_fwd_embed_dim wo_tile_fwd_mlp_dim wo_tile_dlhs_batch_seq
        wo_tile_dlhs_embed_dim wo_tile_dlhs_mlp_dim wo_tile_drhs_batch_seq wo_tile_drhs_embed_dim
        wo_tile_drhs_mlp_dim merge_gating_gmm use_tokamax_gmm use_gmm_v2 use_gather_mosaic_kernel
        ragged_gather_fallback ragged_gather_reduce_fallback ragged_gather_cost_estimate_flops
        ragged_gather_reduce_cost_estimate_flops ragged_gather_cost_estimate_bytes_accessed
        ragged_gather_reduce_cost_estimate_bytes_accessed megablox use_custom_sort_vjp use_ragged_sort
        num_moe_token_chunks moe_chunk_barrier ragged_buffer_factor num_moe_emb_chunks mla_qk_head_chunk_size
        te_comm_gemm_overlap experimental_sa_quant_q_fp8 experimental_sa_quant_k_fp8 causal_block_size"""),
    "numerics": ("f32 upcasts of a few tensors: elementwise work and a little HBM", """
        matmul_precision activations_in_float32 logits_dot_in_fp32 cast_logits_to_fp32 float32_qk_product
        float32_logits float32_weight_sum float32_gate_logits grad_dtype"""),
    "small layer details": ("norms, biases, caps and routing arithmetic: vector work next to the matmuls", """
        v_norm_with_scale qk_norm_with_scale
        attn_logits_soft_cap final_logits_soft_cap normalize_embedding_logits mlp_activations_limit
        attention_bias mlp_bias attention_sink norm_topk_prob routed_scaling_factor routed_score_func
        routed_bias n_routing_groups topk_routing_group use_random_routing capacity_factor
        use_untrainable_positional_embedding trainable_position_size use_qk_clip qk_clip_threshold"""),
    "layout and compilation": ("how XLA lays out the same sharding: tpusim models MaxText's default rules", """
        scan_layers param_scan_axis fused_qkv fused_mlp shard_mode shardy remove_size_one_mesh_axis_from_type
        custom_mesh allow_split_physical_axes optimize_mesh_for_tpu_v6e custom_mesh_and_rule mesh_axes
        logical_axis_rules data_sharding context_sharding ulysses_context_sharding compile_xla_flags
        max_inflight_computations dense_fsdp_use_two_stage_all_gather moe_fsdp_use_two_stage_all_gather
        shard_exp_on_fsdp use_2d_fsdp_sharding vocab_tiling_ag_once moe_dispatch_no_expert_sharding
        use_ring_of_experts inhomogeneous_layer_cycle_interval
        context_parallel_reorder_strategy"""),
}

# A value other than base.yml's is refused: ignoring it would give a wrong answer.
REFUSED: dict[str, tuple[str, str]] = {
    "parallelism": ("mesh axes tpusim does not place yet", """
        pipeline_parallel_layers
        dcn_tensor_sequence_parallelism dcn_tensor_parallelism dcn_sequence_parallelism dcn_expert_parallelism
        ici_fsdp_transpose_parallelism dcn_fsdp_transpose_parallelism ici_context_usp_ulysses_parallelism
        dcn_context_usp_ulysses_parallelism ici_context_autoregressive_parallelism
        dcn_context_autoregressive_parallelism ici_autoregressive_parallelism dcn_autoregressive_parallelism
        ici_diloco_parallelism dcn_diloco_parallelism dcn_context_parallelism enable_diloco"""),
    "training loop": ("changes what one step computes", """
        training_objective use_dpo use_sft enable_rampup_batch_size
        weight_sparsity_n parameter_memory_host_offload use_batch_split_schedule"""),
    "architecture": ("layers tpusim's Transformer does not have yet", """
        mtp_num_layers use_indexer moba engram_layers mhc_expansion_rate
        use_multimodal use_audio sparse_matmul attention_output_dim global_head_dim global_num_kv_heads
        moe_expert_input_dim share_kv_projections hidden_size_per_layer_input vocab_size_per_layer_input
        num_kv_shared_layers use_double_wide_mlp first_num_hash_layers compress_ratios o_lora_rank o_groups
        use_sliced_mla_proj"""),
}

def _split(groups: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {k: g for g, (_, keys) in groups.items() for k in keys.split()}


IGNORED_KEYS, NOTED_KEYS, REFUSED_KEYS = _split(IGNORED), _split(NOTED), _split(REFUSED)


@cache
def base_config() -> dict[str, Any]:
    """MaxText's base.yml (workloads/maxtext/base.yml): every key with its default."""
    return read_yaml(data_dir("workloads") / "maxtext" / "base.yml")


@cache
def model_file(name: str) -> dict[str, Any] | None:
    """MaxText's ``configs/models/<name>.yml``, or None when MaxText has no such model."""
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        return None  # a name, not a path
    path = data_dir("workloads") / "maxtext" / "models" / f"{name}.yml"
    try:
        if not path.is_file():
            return None
    except OSError:  # e.g. a name too long for the file system
        return None
    return read_yaml(path) or {}


def model_names() -> list[str]:
    return sorted(p.stem for p in (data_dir("workloads") / "maxtext" / "models").glob("*.yml"))


def default(key: str) -> Any:
    return base_config().get(key)


def is_default(key: str, value: Any) -> bool:
    d = default(key)
    if isinstance(d, (int, float)) and not isinstance(d, bool) and isinstance(value, (int, float)):
        return float(d) == float(value)
    return value == d
