#pragma once
// The umbrella header: every public blockattn header.

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/attention_varlen.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/int4_kv.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/paged_kv.hpp>
#include <blockattn/quantized_kv.hpp>
#include <blockattn/reference.hpp>
#include <blockattn/softmax.hpp>
#include <blockattn/transformer_block.hpp>
#include <blockattn/types.hpp>
