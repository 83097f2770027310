import { createApp } from 'vue';

import App from './App.vue';
import { createCentrifuge } from './herald.js';
import './style.css';

// Where Herald is: VITE_HERALD_URL at build time (`VITE_HERALD_URL=http://… npm run build`), else the default.
const HERALD_URL = import.meta.env.VITE_HERALD_URL ?? 'http://127.0.0.1:8080';

createApp(App)
  // One WebSocket for the app. Anonymous here (herald.toml allows it); with tokens, pass { token, getToken }.
  .use(createCentrifuge(HERALD_URL.replace(/^http/, 'ws') + '/connection/websocket'))
  .provide('heraldUrl', HERALD_URL)
  .mount('#app');
